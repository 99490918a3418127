"""Plain PyTorch, float64 references written from the equations; they define "correct" for the kernels."""
