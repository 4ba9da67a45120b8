"""The paper's experiments at small scale (reproduce) and the benchmarks against plain k-diffusion."""
