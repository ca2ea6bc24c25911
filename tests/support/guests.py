"""Linux system trees laid out like CentOS/RHEL, Debian/Ubuntu and SUSE installs, and the disks made
from them with real tools (cpio + compressors for the initramfs, mkfs.ext4 -d, sfdisk/sgdisk, dd,
qemu-img).

A tree is a dict {guest path: content}: bytes or str for a file, :class:`Link` for a symbolic link,
``None`` for an empty directory. Tests change the dict (drop a module, make an address static) and
assert what they changed: the dict is the oracle.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid as uuidmod
from dataclasses import dataclass
from pathlib import Path

from .disks import sfdisk, sgdisk
from .files import blank
from .tools import run

Tree = dict[str, "bytes | str | Link | None"]


@dataclass(frozen=True)
class Link:
    target: str


ELF_X86_64, ELF_AARCH64, ELF_I386 = 62, 183, 3


def elf_header(machine: int, bits: int = 64) -> bytes:
    """A 64-byte ELF header: magic, class, little-endian, version, ET_EXEC, ``machine``."""
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1, 1]) + bytes(9)
    return ident + struct.pack("<HHI", 2, machine, 1) + bytes(64 - 24)


def write_tree(root: Path, tree: Tree) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for path, content in sorted(tree.items()):
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            target.mkdir(exist_ok=True)
        elif isinstance(content, Link):
            os.symlink(content.target, target)
        else:
            target.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


#: compressor name -> command reading stdin, writing stdout
COMPRESSORS = {
    "gzip": ["gzip", "-c", "-n"],
    "xz": ["xz", "-c", "--check=crc32"],
    "zstd": ["zstd", "-q", "-c"],
    "lz4": ["lz4", "-l", "-q", "-c"],  # the legacy frame, as the kernel's initramfs unpacker reads it
    "bzip2": ["bzip2", "-c"],
}


def cpio_newc(directory: Path) -> bytes:
    """``find . | cpio -o -H newc`` in ``directory``."""
    names = subprocess.run(["find", "."], cwd=directory, capture_output=True, check=True).stdout
    return subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=directory, input=names, capture_output=True,
                          check=True).stdout


def initramfs(work: Path, files: dict[str, bytes], compression: str = "gzip", early: bool = False) -> bytes:
    """An initramfs image made by cpio and a compressor; with ``early``, an uncompressed
    early-microcode archive in front, as dracut and initramfs-tools write it."""
    main = work / f"initramfs-{uuidmod.uuid4().hex}"
    write_tree(main, {path: data for path, data in files.items()})
    archive = cpio_newc(main)
    body = subprocess.run(COMPRESSORS[compression], input=archive, capture_output=True, check=True).stdout
    shutil.rmtree(main)
    if not early:
        return body
    micro = work / f"early-{uuidmod.uuid4().hex}"
    write_tree(micro, {"/kernel/x86/microcode/GenuineIntel.bin": b"\x01" * 64})
    head = cpio_newc(micro)
    shutil.rmtree(micro)
    return head + body


def module_files(version: str, modules: list[str], prefix: str = "/usr/lib/modules") -> dict[str, bytes]:
    """Module files as a kernel installs them (``kernel/drivers/...``, xz-compressed names)."""
    paths = {"virtio_blk": "drivers/block/virtio_blk", "virtio_pci": "drivers/virtio/virtio_pci",
             "virtio_net": "drivers/net/virtio_net", "virtio_scsi": "drivers/scsi/virtio_scsi",
             "nvme": "drivers/nvme/host/nvme", "virtio": "drivers/virtio/virtio",
             "virtio_ring": "drivers/virtio/virtio_ring", "ext4": "fs/ext4/ext4"}
    return {f"{prefix}/{version}/kernel/{paths[m]}.ko.xz": b"\xfd7zXZ\x00module " + m.encode() for m in modules}


def base_tree() -> Tree:
    """What every system has: accounts, a usr-merged layout with relative links, systemd."""
    return {
        "/bin": Link("usr/bin"), "/sbin": Link("usr/sbin"), "/lib": Link("usr/lib"), "/lib64": Link("usr/lib64"),
        "/usr/lib64": None,
        "/usr/lib/systemd/systemd": elf_header(ELF_X86_64),
        "/usr/sbin/init": Link("../lib/systemd/systemd"),
        "/usr/bin/passwd": elf_header(ELF_X86_64),
        "/etc/passwd": "root:x:0:0:root:/root:/bin/bash\nbin:x:1:1:bin:/bin:/sbin/nologin\n",
        "/etc/shadow": "root:*:19000:0:99999:7:::\n",
        "/etc/hostname": "localhost\n",
        "/tmp": None, "/var/tmp": None, "/root": None, "/home": None,
    }


def cloud_init(python_dir: str, version: str, datasources: list[str] | None) -> Tree:
    tree: Tree = {
        "/usr/bin/cloud-init": "#!/usr/bin/python3\n",
        f"{python_dir}/cloudinit/__init__.py": "",
        f"{python_dir}/cloudinit/version.py": f'__VERSION__ = "{version}"\n_PACKAGED_VERSION = "@@PACKAGED_VERSION@@"\n',
        "/etc/cloud/cloud.cfg": "users:\n - default\ndisable_root: false\ncloud_init_modules:\n - growpart\n",
        "/etc/systemd/system/multi-user.target.wants/cloud-init.service":
            Link("/usr/lib/systemd/system/cloud-init.service"),
        "/usr/lib/systemd/system/cloud-init.service": "[Unit]\nDescription=cloud-init\n",
    }
    if datasources is not None:
        tree["/etc/cloud/cloud.cfg.d/99-datasource.cfg"] = (
            "# written by the image build\ndatasource_list: [ " + ", ".join(datasources) + " ]\n"
            "datasource:\n  AliYun:\n    timeout: 5\n")
    return tree


def kernel_config(builtin: list[str], modular: list[str]) -> str:
    options = {"virtio_blk": "CONFIG_VIRTIO_BLK", "virtio_pci": "CONFIG_VIRTIO_PCI", "virtio_net": "CONFIG_VIRTIO_NET",
               "virtio_scsi": "CONFIG_SCSI_VIRTIO", "nvme": "CONFIG_BLK_DEV_NVME", "virtio": "CONFIG_VIRTIO"}
    lines = ["#", "# Automatically generated file; DO NOT EDIT.", "#", "CONFIG_64BIT=y", "CONFIG_EXT4_FS=y"]
    lines += [f"{options[m]}=y" for m in builtin] + [f"{options[m]}=m" for m in modular]
    lines += [f"# {o} is not set" for m, o in options.items() if m not in builtin and m not in modular]
    return "\n".join(lines) + "\n"


# -- distributions ----------------------------------------------------------------------------------------

RHEL_KERNEL = "4.18.0-513.5.1.el8_9.x86_64"
MACHINE_ID = "3f1c6a51e6b84e0f9a1f4bd3c4f1e2a7"


def rhel_tree(work: Path, root_uuid: str, boot_uuid: str | None = None, *, kernel: str = RHEL_KERNEL,
              initramfs_modules: tuple[str, ...] = ("virtio", "virtio_ring", "virtio_pci", "virtio_blk",
                                                    "virtio_net", "virtio_scsi", "nvme"),
              compression: str = "gzip", early: bool = True) -> Tree:
    """CentOS 8 style: BLS entries with $kernelopts from grubenv, dracut initramfs (early microcode
    + gzip), virtio as modules (=m), ifcfg with DHCP, cloud-init with the AliYun datasource. With
    ``boot_uuid`` the fstab mounts a separate /boot."""
    modules = ["virtio", "virtio_ring", "virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "nvme", "ext4"]
    tree = base_tree()
    tree.update({
        "/etc/os-release": 'NAME="CentOS Linux"\nVERSION="8"\nID="centos"\nID_LIKE="rhel fedora"\n'
                           'VERSION_ID="8"\nPRETTY_NAME="CentOS Linux 8"\n',
        "/etc/centos-release": "CentOS Linux release 8.5.2111\n",
        "/etc/redhat-release": Link("centos-release"),
        "/etc/fstab": "\n#\n# /etc/fstab\n#\n"
                      f"UUID={root_uuid} /                       ext4    defaults        1 1\n"
                      + (f"UUID={boot_uuid} /boot                   ext4    defaults        1 2\n" if boot_uuid else ""),
        "/etc/sysconfig/network-scripts/ifcfg-eth0": 'DEVICE="eth0"\nBOOTPROTO="dhcp"\nONBOOT="yes"\nTYPE="Ethernet"\n',
        "/etc/selinux/config": "SELINUX=disabled\nSELINUXTYPE=targeted\n",
        "/etc/selinux/targeted/policy/policy.33": b"\x8c\xff\x7c\xf9SE Linux",  # selinux-policy-targeted's
        "/etc/default/grub": 'GRUB_TIMEOUT=5\nGRUB_DEFAULT=saved\nGRUB_ENABLE_BLSCFG=true\n',
        f"/usr/lib/modules/{kernel}/modules.builtin": "kernel/fs/ext4/ext4.ko\nkernel/drivers/char/mem.ko\n",
        f"/usr/lib/modules/{kernel}/modules.dep": "".join(
            f"{p.split(f'{kernel}/', 1)[1]}:\n" for p in module_files(kernel, modules)),
    })
    tree.update(module_files(kernel, modules))
    tree.update(cloud_init("/usr/lib/python3.6/site-packages", "21.1", ["AliYun", "NoCloud"]))
    boot = {
        f"/boot/vmlinuz-{kernel}": b"MZ kernel " + kernel.encode(),
        f"/boot/config-{kernel}": kernel_config([], ["virtio", "virtio_pci", "virtio_blk", "virtio_net",
                                                     "virtio_scsi", "nvme"]),
        f"/boot/initramfs-{kernel}.img": initramfs(work, {
            "/init": Link("usr/lib/systemd/systemd"), "/usr/lib/systemd/systemd": elf_header(ELF_X86_64),
            **{p: d for p, d in module_files(kernel, list(initramfs_modules)).items()},
            "/usr/lib/firmware/intel/ibt-12-16.sfi": b"firmware"}, compression, early),
        f"/boot/loader/entries/{MACHINE_ID}-{kernel}.conf":
            f"title CentOS Linux ({kernel}) 8\nversion {kernel}\nlinux /vmlinuz-{kernel}\n"
            f"initrd /initramfs-{kernel}.img $tuned_initrd\noptions $kernelopts $tuned_params\nid centos-{kernel}\n"
            "grub_users $grub_users\ngrub_arg --unrestricted\ngrub_class kernel\n",
        "/boot/grub2/grubenv": grubenv({"saved_entry": f"{MACHINE_ID}-{kernel}",
                                         "kernelopts": f"root=UUID={root_uuid} ro crashkernel=auto"}),
        "/boot/grub2/grub.cfg": "#\n# DO NOT EDIT THIS FILE\n#\nset pager=1\n\n"
                                'if [ -s $prefix/grubenv ]; then\n  load_env\nfi\n'
                                'if [ "${next_entry}" ] ; then\n   set default="${next_entry}"\n'
                                '   set next_entry=\n   save_env next_entry\n   set boot_once=true\nelse\n'
                                '   set default="${saved_entry}"\nfi\n'
                                "insmod part_msdos\ninsmod ext2\n"
                                f"search --no-floppy --fs-uuid --set=root {boot_uuid or root_uuid}\n"
                                "### BEGIN /etc/grub.d/10_linux ###\ninsmod blscfg\nblscfg\n### END /etc/grub.d/10_linux ###\n",
    }
    if not boot_uuid:  # BLS paths are relative to the volume holding /boot
        entry = f"/boot/loader/entries/{MACHINE_ID}-{kernel}.conf"
        boot[entry] = str(boot[entry]).replace("linux /vmlinuz-", "linux /boot/vmlinuz-").replace(
            "initrd /initramfs-", "initrd /boot/initramfs-")
    tree["/boot"] = None
    tree.update(boot)
    return tree


def split_boot(tree: Tree) -> tuple[Tree, Tree]:
    """(root tree, /boot tree with paths relative to /boot) for a separate /boot partition."""
    root = {p: c for p, c in tree.items() if not p.startswith("/boot/")}
    boot = {p[len("/boot"):]: c for p, c in tree.items() if p.startswith("/boot/")}
    return root, boot


def grubenv(values: dict[str, str]) -> str:
    body = "# GRUB Environment Block\n" + "".join(f"{k}={v}\n" for k, v in values.items())
    return body + "#" * (1024 - len(body))


UBUNTU_KERNEL = "5.15.0-91-generic"


def ubuntu_tree(work: Path, root_uuid: str, *, kernel: str = UBUNTU_KERNEL, compression: str = "zstd",
                early: bool = True, netplan: str | None = None) -> Tree:
    """Ubuntu 22.04 style: grub.cfg with submenus, virtio built in (modules.builtin), initramfs-tools
    image (early cpio + zstd), netplan with DHCP, cloud-init in dist-packages."""
    tree = base_tree()
    builtin = ["virtio", "virtio_ring", "virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "nvme"]
    tree.update({
        "/etc/os-release": 'PRETTY_NAME="Ubuntu 22.04.3 LTS"\nNAME="Ubuntu"\nVERSION_ID="22.04"\n'
                           'VERSION="22.04.3 LTS (Jammy Jellyfish)"\nID=ubuntu\nID_LIKE=debian\n',
        "/etc/debian_version": "bookworm/sid\n",
        "/etc/fstab": f"# /etc/fstab: static file system information.\nLABEL=cloudimg-rootfs\t/\t ext4\tdiscard,errors=remount-ro\t0 1\n"
                      f"UUID={root_uuid} /mnt/alt ext4 defaults,nofail 0 2\n"
                      "tmpfs /run/shm tmpfs defaults 0 0\n",
        "/etc/netplan/50-cloud-init.yaml": netplan or (
            "# This file is generated from information provided by the datasource.\n"
            "network:\n    version: 2\n    ethernets:\n        eth0:\n            dhcp4: true\n"
            "            dhcp6: false\n"),
        "/etc/default/grub": 'GRUB_DEFAULT=0\nGRUB_TIMEOUT=0\nGRUB_CMDLINE_LINUX_DEFAULT="console=tty1 console=ttyS0"\n',
        f"/usr/lib/modules/{kernel}/modules.builtin": "".join(
            f"{p.split(f'{kernel}/', 1)[1][:-3]}\n" for p in module_files(kernel, builtin)),
        f"/usr/lib/modules/{kernel}/kernel/fs/ext4": None,
        f"/boot/vmlinuz-{kernel}": b"MZ kernel " + kernel.encode(),
        "/boot/vmlinuz": Link(f"vmlinuz-{kernel}"),
        f"/boot/config-{kernel}": kernel_config([m for m in builtin if m != "virtio_ring"], []),
        f"/boot/initrd.img-{kernel}": initramfs(work, {
            "/init": "#!/bin/sh\n", "/usr/lib/modules/" + kernel + "/kernel/fs/ext4/ext4.ko": b"ext4",
            "/conf/initramfs.conf": "MODULES=most\n"}, compression, early),
        "/boot/initrd.img": Link(f"initrd.img-{kernel}"),
        "/boot/grub/grubenv": grubenv({}),
        "/boot/grub/grub.cfg": "#\n# DO NOT EDIT THIS FILE\n#\nif [ -s $prefix/grubenv ]; then\n  set have_grubenv=true\n"
                               "  load_env\nfi\nif [ \"${next_entry}\" ] ; then\n   set default=\"${next_entry}\"\n"
                               "else\n   set default=\"0\"\nfi\n"
                               "function load_video {\n  insmod all_video\n}\n"
                               f"menuentry 'Ubuntu' --class ubuntu --class gnu-linux $menuentry_id_option "
                               f"'gnulinux-simple-{root_uuid}' {{\n\trecordfail\n\tinsmod ext2\n"
                               f"\tsearch --no-floppy --fs-uuid --set=root {root_uuid}\n"
                               f"\tlinux\t/boot/vmlinuz-{kernel} root=LABEL=cloudimg-rootfs ro console=tty1 "
                               f"console=ttyS0\n\tinitrd\t/boot/initrd.img-{kernel}\n}}\n"
                               f"submenu 'Advanced options for Ubuntu' $menuentry_id_option "
                               f"'gnulinux-advanced-{root_uuid}' {{\n"
                               f"\tmenuentry 'Ubuntu, with Linux {kernel}' --class ubuntu $menuentry_id_option "
                               f"'gnulinux-{kernel}-advanced-{root_uuid}' {{\n"
                               f"\t\tlinux\t/boot/vmlinuz-{kernel} root=LABEL=cloudimg-rootfs ro\n"
                               f"\t\tinitrd\t/boot/initrd.img-{kernel}\n\t}}\n}}\n",
    })
    tree.update(cloud_init("/usr/lib/python3/dist-packages", "23.3.3", None))
    return tree


SUSE_KERNEL = "5.14.21-150500.55.39-default"


def suse_tree(work: Path, root_uuid: str, *, kernel: str = SUSE_KERNEL, compression: str = "xz") -> Tree:
    """SLES 15 SP5 style: grub.cfg (grub2), /boot/vmlinuz and /boot/initrd links, dracut initramfs
    (xz, no early part), wicked ifcfg with DHCP, virtio as modules under /lib/modules (no usr-merge)."""
    modules = ["virtio", "virtio_ring", "virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "nvme"]
    tree = base_tree()
    for link in ("/bin", "/sbin", "/lib", "/lib64"):
        tree[link] = None
    tree["/usr/sbin/init"] = Link("/usr/lib/systemd/systemd")
    tree.update({
        "/etc/os-release": 'NAME="SLES"\nVERSION="15-SP5"\nVERSION_ID="15.5"\nPRETTY_NAME="SUSE Linux Enterprise '
                           'Server 15 SP5"\nID="sles"\nID_LIKE="suse"\n',
        "/etc/fstab": f"UUID={root_uuid}  /  ext4  defaults  0  1\n"
                      "PARTUUID=5eed0001-01  /.snapshots-alias  ext4  defaults,ro  0  0\n",
        "/etc/sysconfig/network/ifcfg-eth0": "BOOTPROTO='dhcp'\nSTARTMODE='auto'\n",
        "/etc/sysconfig/network/ifcfg-lo": "IPADDR=127.0.0.1\nNETMASK=255.0.0.0\nSTARTMODE=nfsroot\nBOOTPROTO=static\n",
        f"/lib/modules/{kernel}/modules.builtin": "kernel/fs/ext4/ext4.ko\n",
        f"/boot/vmlinuz-{kernel}": b"MZ kernel " + kernel.encode(),
        "/boot/vmlinuz": Link(f"vmlinuz-{kernel}"),
        f"/boot/config-{kernel}": kernel_config([], [m for m in modules if m != "virtio_ring"]),
        f"/boot/initrd-{kernel}": initramfs(work, {
            "/init": Link("usr/lib/systemd/systemd"),
            **module_files(kernel, ["virtio", "virtio_ring", "virtio_pci", "virtio_blk", "virtio_scsi"],
                           "/lib/modules")}, compression, False),
        "/boot/initrd": Link(f"initrd-{kernel}"),
        "/boot/grub2/grub.cfg": "set btrfs_relative_path=\"yes\"\nset default=\"${saved_entry}\"\n"
                                "menuentry 'SLES 15-SP5'  --class sles --class gnu-linux --class gnu --class os "
                                f"$menuentry_id_option 'gnulinux-simple-{root_uuid}' {{\n"
                                f"\tsearch --no-floppy --fs-uuid --set=root {root_uuid}\n"
                                f"\tlinux\t/boot/vmlinuz-{kernel} root=UUID={root_uuid}  splash=silent quiet\n"
                                f"\tinitrd\t/boot/initrd-{kernel}\n}}\n",
        "/boot/grub2/grubenv": grubenv({"saved_entry": "SLES 15-SP5"}),
    })
    tree.update(module_files(kernel, modules, "/lib/modules"))
    tree.update(cloud_init("/usr/lib/python3.6/site-packages", "23.3", None))
    return tree


# -- disks ------------------------------------------------------------------------------------------------------


def ext4_image(path: Path, size: int, tree_dir: Path, fs_uuid: str, label: str | None = None) -> Path:
    """An ext4 file system of ``size`` bytes populated from ``tree_dir`` (mkfs.ext4 -d)."""
    blank(path, size)
    args = ["mkfs.ext4", "-q", "-F", "-U", fs_uuid, "-E", "root_owner=0:0,lazy_itable_init=1", "-d", tree_dir]
    if label:
        args += ["-L", label]
    run(*args, path)
    return path


def set_ext_flags(image: Path, guest_path: str, flags: int) -> None:
    """Set inode flags (0x10 immutable, 0x20 append-only) with debugfs, as chattr would."""
    run("debugfs", "-w", "-R", f"set_inode_field {guest_path} flags 0x{flags:x}", image)


def mbr_disk(path: Path, size: int, partitions: list[tuple[int, int, str]], label_id: int = 0x5EED0001) -> Path:
    """A RAW disk with an MBR: (start, size, type) in bytes, the first partition bootable; ``label_id``
    is the disk signature (PARTUUIDs are ``<label_id>-<NN>``)."""
    blank(path, size)
    lines = ["label: dos", f"label-id: 0x{label_id:08x}"]
    for i, (start, length, kind) in enumerate(partitions):
        lines.append(f"start={start // 512}, size={length // 512}, type={kind}" + (", bootable" if i == 0 else ""))
    sfdisk(path, "\n".join(lines) + "\n")
    return path


def gpt_disk(path: Path, size: int, partitions: list[tuple[int, int, str]]) -> Path:
    """A RAW disk with a GPT: (start, size, sgdisk type code) in bytes."""
    blank(path, size)
    args = []
    for number, (start, length, code) in enumerate(partitions, start=1):
        args += [f"-n{number}:{start // 512}:{(start + length) // 512 - 1}", f"-t{number}:{code}"]
    sgdisk(path, *args)
    return path


def new_uuid() -> str:
    return str(uuidmod.uuid4())



def guest_findings(report) -> dict[str, list]:
    """The guest findings of a validation report, by code."""
    found: dict[str, list] = {}
    for finding in report.findings:
        if finding.category == "guest":
            found.setdefault(finding.code, []).append(finding)
    return found
