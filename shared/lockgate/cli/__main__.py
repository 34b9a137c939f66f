"""`python -m lockgate.cli`."""

from lockgate.cli.main import main

if __name__ == "__main__":
    main()
