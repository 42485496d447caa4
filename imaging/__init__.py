"""Images, label maps and DICOM: reading and writing with geometry and limits, labelled datasets, DICOM series,
SEG and RTSTRUCT exports, segment codes, previews, correction files, overlap metrics and checkpoint files.
Shared by the API, the workers and the networks; knows nothing of HTTP, queues or the method. Only
`imaging.checkpoint` imports torch, and the API never imports it."""
