"""Deformable registration of labelled training cases toward a scan (voxelmorph 0.3 + neurite),
weakly supervised by the scan's current mask. Knows nothing of segmentation networks, HTTP or queues."""
