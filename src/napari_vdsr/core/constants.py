"""Defaults shared by the core, the CLI and the widgets (no heavy imports, so ``--help`` stays fast)."""

#: Smallest accepted tile (interior) size in pixels.
MIN_TILE = 16
#: Default tile (interior) size.  With row streaming on the CPU (:mod:`.stream`) a tile's
#: activations take a few bands, not the tile, so large tiles cost little memory and waste
#: less work on halos (2048² output: 1.04x the pixels at 1024 px tiles, 1.12x at 512).
DEFAULT_TILE = 1024
