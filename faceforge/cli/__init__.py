"""The `faceforge` command (the top floor): ``main.py`` parses argv and dispatches; ``deploy.py`` holds the
deployment subcommands (embed, verify, search, export); ``demo.py`` the demo job."""

from faceforge.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
