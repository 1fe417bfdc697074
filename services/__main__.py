import sys

from livepipe.services.cli import main

sys.exit(main())
