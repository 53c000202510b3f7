"""Layer 1, the data path: a split located, its COCO file read and checked, its images checked, the
flat split, label maps; reading, augmenting and batching images; the processor's work on a batch;
the generated shapes dataset."""
