"""Read-side queries operators run (CLI, gRPC, query responder). Pure SQL over a Store."""
