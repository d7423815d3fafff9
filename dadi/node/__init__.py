"""The node daemon: FUSE views of dadi images, the chunk cache, and chunk fetching."""
