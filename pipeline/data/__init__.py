"""The data contract and its readers: sources in, images and crops, the feature-set format and its
statistics, the resumable sharded job that writes it, and the training-time reader."""
