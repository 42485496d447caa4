"""Initial segmentation: image I/O with geometry, datasets, preprocessing, the network, training,
inference and test-time peers. Knows nothing of registration, HTTP or queues."""
