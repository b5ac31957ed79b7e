"""``python -m dynamiq_redis_ckpt.cli``."""

import sys

from dynamiq_redis_ckpt.cli import main

sys.exit(main())
