"""The fused ops: one module per op (public function, autograd, torch.library registration, module)."""
