import sys

from mindspeed_args.cli import main

sys.exit(main())
