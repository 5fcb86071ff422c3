"""The method's mathematics: Gaussian moments through affine maps and ReLUs, the split of a
network at its first ReLU (torch.fx), the moment regularizer and the randomized-smoothing
losses. It imports no other momentreg package."""
