"""cvm_tools.keyprovider: the image owner's wrap-only key provider (`wrap`) and its command (`owner`)."""
