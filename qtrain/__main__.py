"""`python -m qtrain` runs the same entrypoint as the `qtrain` console script."""

from qtrain.cli import main

if __name__ == "__main__":
    main()
