"""cvm_tools.keyprovider: the image owner's wrap-only key provider (`wrap`), its command (`owner`), and layer
encryption as skopeo does it through a key provider (`encrypt`)."""
