"""GitOps: a folder of YAML documents in Git is the truth; `plan` diffs it against what the stack holds
and `apply` makes the stack hold it (documents.py: the folder; plan.py: the pure diff; state.py: I/O)."""
