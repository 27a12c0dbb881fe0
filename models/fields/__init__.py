"""Neural fields in pure PyTorch: coordinate encodings (random Fourier features, NeRF positional encoding),
`grid_sample` modulation grids, a dense voxel grid and a multiresolution hash grid, rays and stratified samples,
the volume renderer, sklearn's sample images as 2-D signals and a procedural 3-D scene with its rendered views."""
