"""The worker side: RQ jobs, the loaded models, segmenting, training, media and the Label Studio client."""
