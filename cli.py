"""Launcher: `python cli.py ...` is the same as the installed `fakd-deploy ...` command."""

from fakd_deploy.cli import app

if __name__ == "__main__":
    app()
