"""`python -m clip_train train|eval|data|export|import|finetune ...` (as `accelerate launch -m` needs)."""

import sys

from clip_train.cli import main

sys.exit(main())
