"""Entry points, presets, the search space, and selection of the champion."""
