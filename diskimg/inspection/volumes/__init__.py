"""Volumes that hold other volumes, between a partition and a file system: LVM2 physical volumes
assembled into volume groups whose logical volumes read as volumes (``lvm``), encrypted containers
(``luks``, ``bitlocker``) and Linux software RAID members (``md``). Each module keeps pure parsers over
bytes apart from the reads of the disks it is given, and every value read is checked and capped."""
