"""One module per op: input checks, fake kernels, autograd and the public function."""
