"""Reading, writing and converting weight files: single files, diffusers folders and CompVis checkpoints."""
