"""The diffusion family's shared kit: coloured-digit data with prompt tokens, the small
prompt-conditioned diffusers U-Net and its folder format, the evaluation kit, guidance rules and
the one sampling core that jobs and the image endpoint both call."""
