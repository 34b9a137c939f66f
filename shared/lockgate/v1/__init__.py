"""Generated gRPC stubs for lockgate.v1 (run `make proto` after editing proto/lockgate/v1)."""
