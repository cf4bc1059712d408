"""``python -m gpubo``: the same as the ``gpubo`` command."""

from gpubo.cli import main

if __name__ == "__main__":
    main(prog_name="gpubo")
