"""Volume managers and containers between a partition and a file system: LVM2 physical volumes assembled
into volume groups whose logical volumes read as volumes (``lvm``), and the encrypted and RAID members
named beside them. Each module keeps pure parsers over bytes apart from the reads of the disks it is
given, and every value read from a disk is checked and capped before use."""
