"""The smtpguard command line, one module per command group (run, policy, lab,
the operator's commands over the socket, libvirt's hook) and main, which builds
the parser and dispatches. It imports the other rooms lazily, inside commands;
nothing imports cli/. `main` is re-exported for installed console scripts."""

from smtpguard.cli.main import main

__all__ = ["main"]
