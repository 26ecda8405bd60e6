import sys

from megatron_minitron.cli import main

sys.exit(main())
