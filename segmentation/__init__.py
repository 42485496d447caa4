"""Initial segmentation network: preprocessing, the network, training, inference, test-time peers and the
segmentation bundle. Reads and writes images through `imaging`; knows nothing of registration, HTTP or queues."""
