"""`python -m smtpguard.cli`."""

import sys

from smtpguard.cli.main import main

sys.exit(main())
