"""Volumes that hold other volumes: encrypted containers (``luks``, ``bitlocker``), Linux software RAID
members (``md``) and LVM2 physical volumes (``lvm``). Each module parses its on-disk structures with
pure functions and reads what it can through any ``Disk`` (``read(offset, length)``)."""
