"""Names of the official DiffewS release (torch-free, so the web process can use them without loading torch)."""

RELEASE_ID = "zzzmmz/Diffews"
"""The ModelScope id of the official weights."""
RELEASE_UNETS = ("incontext", "coco_fold0", "coco_fold1", "coco_fold2", "coco_fold3")
"""The UNet folders the release holds under weight/."""
MODELSCOPE_BASE = "weight/stable-diffusion-2-1-ref8inchannels-tag4inchannels"
"""Where a ModelScope download keeps the base pipeline (VAE, tokenizer, text encoder, scheduler)."""
MODELSCOPE_DEFAULT_UNET = "weight/incontext/unet"
"""The UNet a ModelScope download serves by default."""
