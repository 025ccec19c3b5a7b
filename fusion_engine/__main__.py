import sys

from fusion_engine.cli.main import main

sys.exit(main())
