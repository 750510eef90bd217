"""outrider: RL post-training of language-model reasoners and agents, with exploration, reward and credit
assignment as named, composable, tested pieces."""

from transformers.utils import logging as _hf_logging

_hf_logging.disable_progress_bar()  # checkpoint saves should not print shard bars into our progress display

__version__ = "0.1.0"
