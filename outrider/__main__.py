"""`python -m outrider` runs the command line, like the `outrider` script."""

from outrider.cli import main

if __name__ == "__main__":
    main()
