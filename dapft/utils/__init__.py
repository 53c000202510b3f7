"""Layer 0, what every other layer runs on: the console and progress bars, the device and seeding,
files written atomically and output folders held by locks, stop signals, provenance, the torchrun
process group, checkpoint folders and the experiment trackers. Imports nothing else of dapft."""
