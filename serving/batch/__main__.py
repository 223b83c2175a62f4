import sys

from serving.batch.cli import main

sys.exit(main())
