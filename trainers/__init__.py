"""The run config schema, the per-worker training loop, batches, image sets, models, the Ray Train wrapper,
checkpoints; and, in common/, the bottom layer every package shares."""

import logging

# peft imports bitsandbytes, which warns on every CPU start that an optional 4-bit kernel package is
# missing. We never run 4-bit kernels; the warning only hides the messages that matter.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
