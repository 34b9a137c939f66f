"""`python -m lockgate.cli`."""

from lockgate.cli import main

if __name__ == "__main__":
    main()
