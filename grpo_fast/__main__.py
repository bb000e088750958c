"""`python -m grpo_fast ...` is the `grpo-fast` command (what torchrun launches:
`torchrun --nproc-per-node N -m grpo_fast train --config cfg.yaml`)."""

import sys

from grpo_fast.cli import main

sys.exit(main())
