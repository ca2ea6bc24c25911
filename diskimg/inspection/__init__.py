"""What a disk holds, read through any DiskReader: partition tables (``partitions``), file-system
signatures (``signatures``), the BIOS boot chain (``biosboot``), file-system drivers (``fs``) and the
operating systems on them (``guest``). Pure parsers over a positional read; knows no image format."""
