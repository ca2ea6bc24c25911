"""Linux guest inspection: initramfs listings, configuration parsers, the inspector over real trees,
and the guest rules on disks made with real tools.

The oracle is what each test put in the tree: initramfs images are made by ``cpio -o -H newc`` and
the real compressors; trees become ext4 file systems with ``mkfs.ext4 -d``, are placed in MBR/GPT
disks made by sfdisk/sgdisk, and converted with qemu-img. Each fact and finding is asserted against
the file the test wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import diskimg
from diskimg.inspection.guest import GuestDisk, GuestVolume, inspect_guest
from diskimg.inspection.guest.config import (
    choose_default,
    cloud_init_datasources,
    cloud_init_network_config,
    expand_grub_vars,
    grub_legacy_default,
    kernel_arg,
    network_file_generator,
    parse_bls_entry,
    parse_fstab,
    parse_grub_cfg,
    parse_ifcfg,
    parse_interfaces,
    parse_netplan,
    parse_networkd,
    parse_nm_keyfile,
    parse_yaml,
    sort_bls_entries,
)
from diskimg.inspection.guest.initramfs import list_initramfs
from diskimg.inspection.guest.linux import GuestTree, elf_machine, parse_legacy_release
from diskimg.inspection.signatures import FileSystem

from .support.disks import copy_in, lvm_pv_label, make_esp, write_boot_code
from .support.files import write_at
from .support.filesystems import make_xfs
from .support.guests import (
    ELF_AARCH64,
    ELF_I386,
    ELF_X86_64,
    RHEL_KERNEL,
    SUSE_KERNEL,
    UBUNTU_KERNEL,
    Link,
    cloud_init,
    cpio_newc,
    elf_header,
    ext4_image,
    gpt_disk,
    guest_findings,
    initramfs,
    mbr_disk,
    module_files,
    new_uuid,
    rhel_tree,
    set_ext_flags,
    split_boot,
    suse_tree,
    ubuntu_tree,
    write_tree,
)
from .support.hostfs import HostDirFileSystem
from .support.tools import diskimg_cli, qemu_img
from .support.units import GiB, MiB

needs_cpio = pytest.mark.skipif(any(shutil.which(t) is None for t in ("cpio", "gzip", "xz", "zstd", "lz4", "bzip2")),
                                reason="needs cpio and the compressors")
IMAGE_TOOLS = ("mkfs.ext4", "debugfs", "sfdisk", "sgdisk", "qemu-img", "mkfs.fat", "mcopy", "cpio", "zstd", "lz4")
needs_image_tools = pytest.mark.skipif(any(shutil.which(t) is None for t in IMAGE_TOOLS),
                                       reason="needs " + ", ".join(IMAGE_TOOLS))


# =====================================================================================================
# initramfs
# =====================================================================================================


def _payload() -> dict[str, bytes]:
    files = module_files("6.1.0", ["virtio_blk", "virtio_pci", "nvme"])
    files["/usr/lib/firmware/rtl_nic/rtl8168g-2.fw"] = b"fw"
    files["/init"] = b"#!/bin/sh\n"
    return files


def _expected_names(files: dict[str, bytes]) -> set[str]:
    names = set()
    for path in files:
        parts = path.strip("/").split("/")
        names.add("/".join(parts))
        names.update("/".join(parts[:i]) + "/" for i in range(1, len(parts)))
    return names


@needs_cpio
@pytest.mark.parametrize("compression", ["gzip", "xz", "zstd", "lz4", "bzip2"])
@pytest.mark.parametrize("early", [False, True])
def test_initramfs_lists_every_name(tmp_path: Path, compression: str, early: bool) -> None:
    files = _payload()
    listing = list_initramfs(initramfs(tmp_path, files, compression, early))
    assert listing.complete, listing.problem
    main = set(listing.names)
    if early:
        assert listing.parts[0].compression is None and listing.parts[1].compression == compression
        assert "kernel/x86/microcode/GenuineIntel.bin" in main
        main -= {"kernel/", "kernel/x86/", "kernel/x86/microcode/", "kernel/x86/microcode/GenuineIntel.bin"}
    else:
        assert [p.compression for p in listing.parts] == [compression]
    assert main == _expected_names(files)
    assert listing.modules == {"virtio_blk": "usr/lib/modules/6.1.0/kernel/drivers/block/virtio_blk.ko.xz",
                               "virtio_pci": "usr/lib/modules/6.1.0/kernel/drivers/virtio/virtio_pci.ko.xz",
                               "nvme": "usr/lib/modules/6.1.0/kernel/drivers/nvme/host/nvme.ko.xz"}
    assert listing.firmware == ["usr/lib/firmware/rtl_nic/rtl8168g-2.fw"]


@needs_cpio
def test_initramfs_lzma_and_concatenated_compressed_parts(tmp_path: Path) -> None:
    first = {"/a/one.ko": b"1"}
    second = {"/b/two.ko.zst": b"2"}
    lzma_part = subprocess.run(["xz", "--format=lzma", "-c"], input=cpio_newc(write_tree(tmp_path / "x", first)),
                               capture_output=True, check=True).stdout
    image = lzma_part + initramfs(tmp_path, second, "gzip")
    listing = list_initramfs(image)
    assert listing.complete, listing.problem
    assert [p.compression for p in listing.parts] == ["lzma", "gzip"]
    assert {"a/one.ko", "b/two.ko.zst"} <= set(listing.names)


@needs_cpio
def test_initramfs_damage_and_caps_are_reported_not_raised(tmp_path: Path) -> None:
    image = initramfs(tmp_path, _payload(), "gzip", early=True)
    truncated = list_initramfs(image[: len(image) - 200])
    assert not truncated.complete and "gzip part" in truncated.problem
    assert "kernel/x86/microcode/GenuineIntel.bin" in truncated.names  # the early part was read before
    capped = list_initramfs(image, max_decompressed=1024)
    assert not capped.complete and "more than" in capped.problem
    assert "lzo" in list_initramfs(b"\x89LZO\x00\x0d\x0a\x1a\x0a" + bytes(100)).problem
    assert "unrecognised data" in list_initramfs(b"hello world").problem
    assert list_initramfs(b"070701" + b"zz" * 60).problem  # a header with non-hex fields


@pytest.fixture(scope="module")
def sample_initramfs(tmp_path_factory) -> bytes:
    return initramfs(tmp_path_factory.mktemp("fuzz"), _payload(), "gzip", early=True)


@needs_cpio
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_initramfs_mutations_never_raise(sample_initramfs: bytes, data) -> None:
    image = bytearray(sample_initramfs)
    for _ in range(data.draw(st.integers(1, 6))):
        image[data.draw(st.integers(0, len(image) - 1))] = data.draw(st.integers(0, 255))
    image = image[: data.draw(st.integers(0, len(image)))]
    listing = list_initramfs(bytes(image))
    assert listing.complete or listing.problem


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab:-[]{}'\"# \n\t=$;>/01")), max_size=400))
def test_config_parsers_take_any_text(text: str) -> None:
    parse_yaml(text)
    parse_grub_cfg(text)
    parse_netplan(text, "x.yaml")
    parse_interfaces(text, "interfaces")
    parse_fstab(text)
    parse_ifcfg(text, "ifcfg-eth0")
    parse_nm_keyfile(text, "k")
    parse_networkd(text, "n.network")
    grub_legacy_default(text)
    cloud_init_network_config(text)
    network_file_generator("ifcfg-eth0", text)


# =====================================================================================================
# configuration parsers
# =====================================================================================================


def test_fstab_and_grub_default_resolution() -> None:
    fstab = parse_fstab("# c\nUUID=abc / ext4 defaults 1 1\n/dev/sdb1\t/my\\040data xfs nofail 0 0\nbroken\n")
    assert [(e.spec, e.mountpoint, e.nofail, e.line) for e in fstab] == [
        ("UUID=abc", "/", False, 2), ("/dev/sdb1", "/my data", True, 3)]
    cfg = parse_grub_cfg(
        "set default=\"1>1\"\nmenuentry 'A' --id a {\n linux /vmlinuz-1 root=UUID=x\n initrd /initrd-1\n}\n"
        "submenu 'Adv' {\n menuentry 'B' { linux /vmlinuz-2 }\n menuentry 'C' $menuentry_id_option 'c-id' {\n"
        "  linux /vmlinuz-3 ro\n }\n}\nmenuentry 'D' { linux /vmlinuz-4 }\n")
    assert [e.title for e in cfg.entries] == ["A", "Adv>B", "Adv>C", "D"]
    assert choose_default(cfg.entries, cfg.default).linux == "/vmlinuz-3"
    assert choose_default(cfg.entries, "2").title == "D"
    assert choose_default(cfg.entries, "c-id").title == "Adv>C"
    assert choose_default(cfg.entries, "Adv>B").linux == "/vmlinuz-2"
    assert choose_default(cfg.entries, "7") is None
    assert cfg.entries[0].initrd == ["/initrd-1"] and cfg.entries[0].options == "root=UUID=x"


def test_bls_entries_order_and_grub_variables() -> None:
    entries = [parse_bls_entry(f"title T {v}\nversion {v}\nlinux /vmlinuz-{v}\ninitrd /initramfs-{v}.img $extra\n"
                               "options $kernelopts quiet\n", f"/boot/loader/entries/m-{v}.conf")
               for v in ("5.14.0-70.el9", "5.14.0-362.el9", "5.14.0-9.el9")]
    ordered = sort_bls_entries(entries)
    assert [e.version for e in ordered] == ["5.14.0-362.el9", "5.14.0-70.el9", "5.14.0-9.el9"]  # newest first
    assert ordered[0].id == "m-5.14.0-362.el9" and ordered[0].initrd == ["/initramfs-5.14.0-362.el9.img", "$extra"]
    options = expand_grub_vars(ordered[0].options, {"kernelopts": "root=UUID=abc ro"})
    assert options == "root=UUID=abc ro quiet"
    assert kernel_arg(options, "root") == "UUID=abc" and kernel_arg(options, "selinux") is None


def test_network_parsers() -> None:
    static = parse_ifcfg('DEVICE=eth0\nBOOTPROTO=none\nIPADDR=10.0.0.5\nHWADDR="52:54:00:12:34:56"\n', "ifcfg-eth0")
    assert (static.name, static.ipv4, static.mac) == ("eth0", "static", "52:54:00:12:34:56")
    assert parse_ifcfg("BOOTPROTO='dhcp'\nSTARTMODE='auto'\n", "/x/ifcfg-eth1").name == "eth1"
    nm = parse_nm_keyfile("[connection]\nid=x\ntype=ethernet\ninterface-name=ens3\n[ethernet]\n"
                          "mac-address=AA:BB:CC:DD:EE:FF\n[ipv4]\nmethod=manual\naddress1=10.1.1.1/24\n", "k")
    assert (nm.name, nm.ipv4, nm.mac) == ("ens3", "static", "AA:BB:CC:DD:EE:FF")
    networkd = parse_networkd("[Match]\nName=en*\n[Network]\nDHCP=ipv4\n", "10.network")
    assert (networkd.name, networkd.ipv4) == ("en*", "dhcp")
    found, includes = parse_interfaces("auto lo\niface lo inet loopback\nsource /etc/network/interfaces.d/*\n"
                                       "auto eth0\niface eth0 inet static\n  address 10.0.0.2\n"
                                       "  hwaddress ether 52:54:00:aa:bb:cc\n", "interfaces")
    assert [(i.name, i.ipv4, i.mac, i.enabled) for i in found] == [("eth0", "static", "52:54:00:aa:bb:cc", True)]
    assert includes == ["/etc/network/interfaces.d/*"]
    plan = parse_netplan("network:\n  version: 2\n  ethernets:\n    id0:\n      match:\n        macaddress: "
                         "'52:54:00:00:00:01'\n      set-name: eth0\n      addresses: [10.0.0.9/24, 'fe80::1/64']\n"
                         "    eth1:\n      dhcp4: yes\n", "p.yaml")
    assert [(i.name, i.ipv4, i.ipv6, i.mac) for i in plan] == [("eth0", "static", "static", "52:54:00:00:00:01"),
                                                              ("eth1", "dhcp", None, None)]


def test_yaml_subset_against_pyyaml() -> None:
    yaml = pytest.importorskip("yaml")  # only the oracle: diskimg does not depend on it
    text = ("# comment\ndatasource_list: [ NoCloud, AliYun ]\nusers:\n  - default\n  - name: bob\n    groups: wheel\n"
            "system_info:\n  distro: centos\n  paths:\n    cloud_dir: /var/lib/cloud\n  flag: true\n"
            "empty:\nquoted: 'a: b'\n")
    assert parse_yaml(text) == yaml.safe_load(text)
    assert cloud_init_datasources(text) == ["NoCloud", "AliYun"]
    assert cloud_init_datasources("datasource:\n  Ec2: {}\n") is None


def test_elf_and_legacy_release() -> None:
    assert elf_machine(elf_header(ELF_AARCH64)) == "arm64"
    assert elf_machine(elf_header(ELF_I386, bits=32)) == "i386"
    assert elf_machine(b"MZ" + bytes(62)) is None
    assert parse_legacy_release("/etc/redhat-release", "CentOS release 6.10 (Final)\n")[
        "VERSION_ID"] == "6.10"
    suse = parse_legacy_release("/etc/SuSE-release", "SUSE Linux Enterprise Server 11 (x86_64)\nVERSION = 11\n"
                                "PATCHLEVEL = 4\n")
    assert (suse["ID"], suse["VERSION_ID"]) == ("sles", "11.4")


# =====================================================================================================
# the inspector over host trees (the same contract as the file system readers)
# =====================================================================================================


class HostDisk(GuestDisk):
    """Volumes served from host directories."""

    def __init__(self, volumes: list[tuple[Path, str | None, str | None]]) -> None:
        made = []
        self.by_volume: dict[int, HostDirFileSystem] = {}
        for number, (directory, uuid, label) in enumerate(volumes, start=1):
            volume = GuestVolume(f"partition {number}", number, number * MiB, MiB,
                                 FileSystem("ext4", uuid=uuid, label=label))
            made.append(volume)
            self.by_volume[id(volume)] = HostDirFileSystem(directory)
        super().__init__(None, made)  # type: ignore[arg-type]

    def open(self, volume: GuestVolume) -> HostDirFileSystem:
        return self.by_volume[id(volume)]


@needs_cpio
def test_inspector_rhel_with_separate_boot(tmp_path: Path) -> None:
    root_uuid, boot_uuid = new_uuid(), new_uuid()
    root, boot = split_boot(rhel_tree(tmp_path, root_uuid, boot_uuid, compression="xz"))
    facts = inspect_guest(HostDisk([(write_tree(tmp_path / "boot", boot), boot_uuid, None),
                                    (write_tree(tmp_path / "root", root), root_uuid, None)]))
    assert (facts.os_type, facts.distribution, facts.version, facts.platform, facts.architecture) == (
        "linux", "centos", "8", "CentOS", "x86_64")
    linux = facts.inspection
    assert linux.root.number == 2 and linux.mounts["/boot"].number == 1
    assert linux.boot.loader == "grub2+bls"
    assert linux.boot.default.version == RHEL_KERNEL
    assert linux.boot.kernel_path == f"/boot/vmlinuz-{RHEL_KERNEL}"
    assert linux.boot.cmdline == f"root=UUID={root_uuid} ro crashkernel=auto"  # $kernelopts from grubenv
    assert linux.default_kernel.version == RHEL_KERNEL
    assert linux.boot_drivers == {"virtio_blk": "initramfs", "virtio_pci": "initramfs", "virtio_net": "initramfs",
                                  "virtio_scsi": "initramfs", "nvme": "initramfs"}
    assert [p.compression for p in linux.initramfs.parts] == [None, "xz"]
    assert linux.cloud_init["version"] == "21.1" and linux.cloud_init["datasources"] == ["AliYun", "NoCloud"]
    assert [(i.name, i.ipv4) for i in linux.interfaces] == [("eth0", "dhcp")]
    assert linux.selinux == "disabled" and linux.root_account and linux.passwd_command == "/usr/bin/passwd"
    assert facts.to_dict()["details"]["kernels"][0]["drivers"]["virtio_blk"] == "module"


@needs_cpio
def test_inspector_ubuntu_builtin_drivers_and_suse_links(tmp_path: Path) -> None:
    uuid = new_uuid()
    facts = inspect_guest(HostDisk([(write_tree(tmp_path / "u", ubuntu_tree(tmp_path, uuid)), uuid,
                                     "cloudimg-rootfs")]))
    linux = facts.inspection
    assert (facts.platform, facts.version) == ("Ubuntu", "22.04")
    assert linux.boot.default.title == "Ubuntu" and linux.boot.kernel_path == f"/boot/vmlinuz-{UBUNTU_KERNEL}"
    assert set(linux.boot_drivers.values()) == {"builtin"}
    assert [p.compression for p in linux.initramfs.parts] == [None, "zstd"]
    assert [(c.entry.mountpoint, c.status) for c in linux.fstab] == [("/", "ok"), ("/mnt/alt", "ok"),
                                                                     ("/run/shm", "skipped")]
    uuid = new_uuid()
    facts = inspect_guest(HostDisk([(write_tree(tmp_path / "s", suse_tree(tmp_path, uuid)), uuid, None)]))
    linux = facts.inspection
    assert (facts.platform, facts.version) == ("SUSE", "15.5")
    assert linux.boot.default.title == "SLES 15-SP5"  # saved_entry names it by title
    assert linux.default_kernel.version == SUSE_KERNEL
    # virtio_net is a module under /lib/modules, not in the initramfs: loaded after the root is mounted
    assert linux.boot_drivers == {"virtio_blk": "initramfs", "virtio_pci": "initramfs", "virtio_net": "module",
                                  "virtio_scsi": "initramfs", "nvme": "module"}
    assert linux.nvme_support == "unsupported"


def test_guest_tree_resolves_links_across_mounts(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "root", {"/usr": None, "/etc/os-release": Link("../usr/lib/os-release"),
                                          "/bin": Link("/usr/bin")})
    usr = write_tree(tmp_path / "usr", {"/lib/os-release": "ID=debian\n", "/bin/sh": Link("dash"),
                                        "/bin/dash": elf_header(ELF_I386, 32)})
    tree = GuestTree(HostDirFileSystem(root))
    tree.mount("/usr", HostDirFileSystem(usr))
    assert tree.read("/etc/os-release", 100) == b"ID=debian\n"
    assert tree.resolve("/bin/sh") == "/usr/bin/dash"
    assert elf_machine(tree.head("/bin/sh", 64)) == "i386"
    assert tree.resolve("/bin/../../../etc/os-release", follow=False) == "/etc/os-release"


# =====================================================================================================
# validation of disks made with real tools
# =====================================================================================================


def _disk(tmp: Path, name: str, parts: list[tuple[dict, str, str | None, int]], scheme: str = "mbr",
          esp: bool = False, size: int = 20 * GiB, flags: dict[str, int] | None = None,
          holes: dict[str, int] | None = None) -> Path:
    """A disk of ext4 partitions made from trees: (tree, uuid, label, partition size). With ``esp``
    (GPT) a BIOS boot partition and an ESP come first; ``holes`` extends files of the first tree by
    that many bytes of holes (truncate) before mkfs.ext4 -d copies them, sparse. Returns the RAW disk."""
    work = tmp / name
    work.mkdir()
    layout, images = [], []
    offset = MiB
    if esp:
        layout += [(offset, MiB, "ef02"), (offset + MiB, 33 * MiB, "ef00")]
        images.append((make_esp(work / "esp.img", 33 * MiB, {"EFI/BOOT/BOOTX64.EFI": b"MZ" + bytes(64)}),
                       offset + MiB))
        offset += 34 * MiB
    for number, (tree, uuid, label, length) in enumerate(parts):
        length = length or size - offset - MiB
        tree_dir = write_tree(work / f"tree{number}", tree)
        for path, extra in (holes or {}).items():
            if number == 0:
                os.truncate(tree_dir / path.lstrip("/"), (tree_dir / path.lstrip("/")).stat().st_size + extra)
        fs_image = ext4_image(work / f"p{number}.img", min(length, 96 * MiB), tree_dir, uuid, label)
        for path, value in (flags or {}).items():
            if number == 0:
                set_ext_flags(fs_image, path, value)
        images.append((fs_image, offset))
        layout.append((offset, length, "83" if scheme == "mbr" else "8300"))
        offset += length
    disk = (mbr_disk if scheme == "mbr" else gpt_disk)(work / "disk.raw", size, layout)
    for image, at in images:
        copy_in(disk, image, at)
    write_boot_code(disk)
    return disk


@pytest.fixture(scope="module")
def good_disks(tmp_path_factory) -> dict[str, Path]:
    """CentOS (MBR, separate /boot, gzip initramfs), Ubuntu (GPT with BIOS boot and ESP, zstd), SUSE
    (MBR, xz): each one as it should be."""
    tmp = tmp_path_factory.mktemp("good")
    disks = {}
    root_uuid, boot_uuid = new_uuid(), new_uuid()
    root, boot = split_boot(rhel_tree(tmp, root_uuid, boot_uuid))
    disks["centos"] = _disk(tmp, "centos", [(boot, boot_uuid, None, 128 * MiB), (root, root_uuid, None, 0)])
    uuid = new_uuid()
    disks["ubuntu"] = _disk(tmp, "ubuntu", [(ubuntu_tree(tmp, uuid), uuid, "cloudimg-rootfs", 0)], "gpt", esp=True)
    uuid = new_uuid()
    disks["suse"] = _disk(tmp, "suse", [(suse_tree(tmp, uuid, compression="xz"), uuid, None, 0)])
    return disks


@needs_image_tools
@pytest.mark.parametrize("name,platform,version", [("centos", "CentOS", "8"), ("ubuntu", "Ubuntu", "22.04"),
                                                   ("suse", "SUSE", "15.5")])
@pytest.mark.parametrize("fmt", ["qcow2", "vpc"])
def test_good_images_have_no_guest_problems(good_disks, tmp_path: Path, name: str, platform: str, version: str,
                                            fmt: str) -> None:
    image = tmp_path / f"{name}.{fmt}"
    qemu_img("convert", "-f", "raw", "-O", fmt, good_disks[name], image)
    report = diskimg.validate(image)
    guest = guest_findings(report)
    assert set(guest) <= {"guest-os", "guest-nvme"}, {c: [f.message for f in f_] for c, f_ in guest.items()}
    assert not [n for n in report.not_checked if n["category"] == "guest"], report.not_checked
    assert report.importable
    params = report.import_image
    assert (params["Platform"], params["OSType"], params["Architecture"]) == (platform, "linux", "x86_64")
    facts = report.facts.guest
    assert (facts["distribution"], facts["version"], facts["platform"]) == (name if name != "suse" else "sles",
                                                                            version, platform)
    assert all(line["status"] in ("ok", "skipped") for line in facts["details"]["fstab"])
    if name == "suse":  # PARTUUID=<MBR signature>-01 names the first partition
        assert facts["details"]["fstab"][1]["partition"] == 1
    expected_nvme = "unsupported" if name == "suse" else "supported"  # SUSE's initramfs lacks nvme
    assert params["Features.NvmeSupport"] == expected_nvme
    assert guest["guest-nvme"][0].evidence["value"] == expected_nvme


@needs_image_tools
def test_cli_json_guest_object(good_disks, tmp_path: Path) -> None:
    proc = diskimg_cli("validate", good_disks["ubuntu"], "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    guest = result["disks"][0]["guest"]
    assert guest["os_type"] == "linux" and guest["architecture"] == "x86_64"
    assert guest["root"]["partition"] == 3 and guest["root"]["label"] == "cloudimg-rootfs"
    details = guest["details"]
    assert details["default_kernel"] == UBUNTU_KERNEL
    assert details["boot"]["default"]["title"] == "Ubuntu"
    assert details["cloud_init"]["version"] == "23.3.3"
    assert details["network"] == [{"name": "eth0", "source": "/etc/netplan/50-cloud-init.yaml", "ipv4": "dhcp",
                                   "ipv6": None, "mac": None, "enabled": True, "generator": "cloud-init"}]
    assert result["import_image"]["Platform"] == "Ubuntu"
    text = diskimg_cli("validate", good_disks["ubuntu"], cwd=tmp_path).stdout.decode()
    assert "guest:" in text and "Platform=Ubuntu" in text and "OSType=linux" in text


@pytest.fixture(scope="module")
def bad_centos(tmp_path_factory) -> tuple[Path, dict]:
    """CentOS with one instance of each problem the guest rules find."""
    tmp = tmp_path_factory.mktemp("bad")
    root_uuid, boot_uuid, gone = new_uuid(), new_uuid(), new_uuid()
    tree = rhel_tree(tmp, root_uuid, boot_uuid, initramfs_modules=("virtio", "virtio_ring", "virtio_net"))
    tree["/etc/fstab"] = str(tree["/etc/fstab"]) + (f"UUID={gone} /data ext4 defaults 0 2\n"
                                                    "/dev/sdb1 /srv ext4 defaults,nofail 0 0\n")
    tree["/etc/sysconfig/network-scripts/ifcfg-eth0"] = ('DEVICE=eth0\nBOOTPROTO=static\nIPADDR=192.168.1.10\n'
                                                         'HWADDR=52:54:00:12:34:56\nONBOOT=yes\n')
    tree["/etc/udev/rules.d/70-persistent-net.rules"] = (
        'SUBSYSTEM=="net", ACTION=="add", DRIVERS=="?*", ATTR{address}=="52:54:00:12:34:56", NAME="eth0"\n')
    tree["/usr/lib/python3.6/site-packages/cloudinit/version.py"] = '__VERSION__ = "0.7.5"\n'
    tree["/usr/bin/qemu-ga"] = elf_header(62)
    tree["/etc/selinux/config"] = "SELINUX=enforcing\nSELINUXTYPE=targeted\n"
    tree["/etc/passwd"] = "bin:x:1:1:bin:/bin:/sbin/nologin\n"
    tree["/lib64"] = Link("/usr/lib64")
    root, boot = split_boot(tree)
    data = {"/lost+found": None, "/readme": "data\n"}
    disk = _disk(tmp, "bad", [(root, root_uuid, None, 10 * GiB), (boot, boot_uuid, None, 128 * MiB),
                              (data, new_uuid(), None, 0)], flags={"/etc/shadow": 0x80010})
    image = tmp / "bad.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disk, image)
    return image, {"gone": gone, "root_uuid": root_uuid}


@needs_image_tools
def test_bad_image_reports_each_guest_problem(bad_centos) -> None:
    image, made = bad_centos
    report = diskimg.validate(image)
    found = guest_findings(report)
    assert not report.importable
    virtio = found["guest-virtio-missing"][0]
    assert virtio.evidence["value"] == ["virtio_blk", "virtio_pci"]  # virtio_net is in the initramfs
    assert virtio.evidence["kernel"] == RHEL_KERNEL and "dracut" in virtio.hint
    unresolved = found["guest-fstab-unresolved"]
    assert [f.evidence["spec"] for f in unresolved] == [f"UUID={made['gone']}"]  # /dev/sdb1 is nofail
    assert [f.evidence["spec"] for f in found["guest-device-name"]] == ["/dev/sdb1"]
    assert found["guest-static-ip"][0].evidence["interface"] == "eth0"
    assert [f.evidence["value"] for f in found["guest-mac-address"]] == ["52:54:00:12:34:56"]
    assert found["guest-persistent-net-rules"][0].evidence["value"] == ["52:54:00:12:34:56"]
    assert found["guest-cloud-init-old"][0].evidence["value"] == "0.7.5"
    assert found["guest-qemu-guest-agent"][0].evidence["file"] == "/usr/bin/qemu-ga"
    assert found["guest-selinux-enforcing"][0].evidence["file"] == "/etc/selinux/config"
    assert found["guest-shadow-immutable"][0].severity.value == "error"
    assert "immutable" in found["guest-shadow-immutable"][0].evidence["value"]
    assert [f.evidence["file"] for f in found["guest-root-account"]] == ["/etc/passwd"]
    assert found["guest-lib-absolute-symlink"][0].evidence == {"file": "/lib64", "value": "/usr/lib64"}
    assert found["guest-root-not-last"][0].evidence == {"partition": 1, "value": [2, 3]}
    assert report.import_image["Features.NvmeSupport"] == "unsupported"  # nvme left out of this initramfs
    assert {f.code for f in report.errors} >= {"guest-virtio-missing", "guest-fstab-unresolved", "guest-static-ip",
                                              "guest-shadow-immutable"}


@needs_image_tools
def test_broken_boot_entry_and_device_names(tmp_path: Path) -> None:
    uuid = new_uuid()
    tree = ubuntu_tree(tmp_path, uuid)
    del tree[f"/boot/vmlinuz-{UBUNTU_KERNEL}"]
    tree["/boot/vmlinuz"] = Link("vmlinuz-0")
    tree["/boot/grub/grub.cfg"] = str(tree["/boot/grub/grub.cfg"]).replace("root=LABEL=cloudimg-rootfs ro console",
                                                                           "root=/dev/sda9 ro console")
    report = diskimg.validate(_disk(tmp_path, "ub", [(tree, uuid, "cloudimg-rootfs", 0)]))
    found = guest_findings(report)
    messages = [f.evidence["value"] for f in found["guest-boot-entry-broken"]]
    assert messages == [f"/boot/vmlinuz-{UBUNTU_KERNEL}", "/dev/sda9"]
    assert found["guest-device-name"][0].evidence["value"] == "/dev/sda9"
    assert any(n["check"] == "linux_drivers" for n in report.not_checked)  # the kernel is not there to check


@needs_image_tools
def test_unreadable_initramfs_missing_cloud_init_and_boot_config(tmp_path: Path) -> None:
    uuid = new_uuid()
    tree = suse_tree(tmp_path, uuid, compression="gzip")
    image = tree[f"/boot/initrd-{SUSE_KERNEL}"]
    tree[f"/boot/initrd-{SUSE_KERNEL}"] = image[: len(image) // 2]  # type: ignore[index]
    report = diskimg.validate(_disk(tmp_path, "s1", [(tree, uuid, None, 0)]))
    found = guest_findings(report)
    assert "gzip" in found["guest-initramfs-unreadable"][0].evidence["value"]
    assert any(n["check"] == "linux_drivers" and "virtio_blk" in n["reason"] for n in report.not_checked)
    assert "guest-virtio-missing" not in found  # not known: not guessed

    tree = {p: c for p, c in suse_tree(tmp_path, uuid).items()
            if not p.startswith(("/boot/grub2", "/usr/bin/cloud-init", "/usr/lib/python3.6"))}
    report = diskimg.validate(_disk(tmp_path, "s2", [(tree, uuid, None, 0)]))
    found = guest_findings(report)
    assert "guest-cloud-init-missing" in found and "guest-boot-config-missing" in found
    assert report.facts.guest["details"]["default_kernel"] == SUSE_KERNEL  # the newest installed kernel


@needs_image_tools
def test_arm64_needs_uefi_and_no_guest(tmp_path: Path) -> None:
    uuid = new_uuid()
    tree = ubuntu_tree(tmp_path, uuid)
    tree["/usr/lib/systemd/systemd"] = elf_header(ELF_AARCH64)
    report = diskimg.validate(_disk(tmp_path, "arm", [(tree, uuid, "cloudimg-rootfs", 0)]))
    found = guest_findings(report)
    assert found["guest-arm64-not-uefi"][0].evidence["architecture"] == "arm64"
    assert report.import_image["Architecture"] == "arm64"
    report = diskimg.validate(_disk(tmp_path, "arm-uefi", [(tree, uuid, "cloudimg-rootfs", 0)], "gpt", esp=True))
    assert "guest-arm64-not-uefi" not in guest_findings(report)

    report = diskimg.validate(_disk(tmp_path, "empty", [({"/srv/data": "x"}, new_uuid(), None, 0)]))
    assert "guest-not-found" in guest_findings(report)
    assert report.import_image["Platform"] is None


@needs_image_tools
def test_root_on_lvm_is_not_checked_rather_than_not_found(tmp_path: Path) -> None:
    """CentOS 7's default layout: /boot on ext4, the root in LVM, which diskimg does not assemble."""
    boot_uuid = new_uuid()
    _, boot = split_boot(rhel_tree(tmp_path, new_uuid(), boot_uuid))
    disk = _disk(tmp_path, "lvm", [(boot, boot_uuid, None, 128 * MiB), ({"/x": "y"}, new_uuid(), None, 0)])
    start = 129 * MiB
    write_at(disk, start, bytes(4096))  # the ext4 superblock gone: a PV label instead
    write_at(disk, start + 512, lvm_pv_label(device_size=20 * GiB - start - MiB))
    report = diskimg.validate(disk)
    assert "guest-not-found" not in guest_findings(report)
    reasons = [n["reason"] for n in report.not_checked if n["check"] == "guest_found"]
    assert reasons and "LVM" in reasons[0] and "partition 2" in reasons[0]


@needs_image_tools
@pytest.mark.skipif(shutil.which("mkfs.xfs") is None, reason="needs mkfs.xfs")
def test_suse_on_xfs(tmp_path: Path) -> None:
    pytest.importorskip("diskimg.inspection.fs.xfs")
    uuid = new_uuid()
    tree = write_tree(tmp_path / "tree", suse_tree(tmp_path, uuid, compression="lz4"))
    disk = mbr_disk(tmp_path / "disk.raw", 20 * GiB, [(MiB, 20 * GiB - 2 * MiB, "83")])
    part = make_xfs(tmp_path / "xfs.img", tree, "-m", f"uuid={uuid}")  # XFS needs partitions of 300 MiB and more
    copy_in(disk, part, MiB)
    write_boot_code(disk)
    image = tmp_path / "suse.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", disk, image)
    report = diskimg.validate(image)
    guest = report.facts.guest
    assert (guest["platform"], guest["version"], guest["root"]["file_system"]) == ("SUSE", "15.5", "xfs")
    linux_parts = guest["details"]["initramfs"]["parts"]
    assert [p["compression"] for p in linux_parts] == ["lz4"]
    assert guest["details"]["boot_drivers"]["virtio_blk"] == "initramfs"
    assert set(guest_findings(report)) <= {"guest-os", "guest-nvme"}


# The child's peak memory is its own address space's high-water mark (VmHWM): getrusage's ru_maxrss
# survives exec and, after a vfork from a large test process, reports the parent's peak instead.
_VALIDATE_SUMMARY = """import json, re, sys, diskimg
report = diskimg.validate(sys.argv[1])
status = open("/proc/self/status").read()
print(json.dumps({"details": report.facts.guest["details"], "codes": [f.code for f in report.findings],
                  "max_rss_kib": int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))}))"""


def _validate_in_child(disk: Path, timeout: float = 60) -> dict:
    """``diskimg.validate`` in a child process under a deadline: the guest details, the finding codes and
    the child's peak memory (a hang fails the test at the deadline instead of stalling the suite)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _VALIDATE_SUMMARY, disk], capture_output=True, timeout=timeout,
                          env=env, check=True)
    return json.loads(proc.stdout)


@needs_image_tools
def test_initramfs_with_a_long_zero_tail_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """Issue 12 #12: an initramfs followed by 250 MiB of NUL padding (a sparse file: the disk holds a
    few KiB of it) was skipped one byte at a time in Python and held in memory whole (66 s, 790 MB)."""
    uuid = new_uuid()
    initrd = f"/boot/initrd-{SUSE_KERNEL}"
    disk = _disk(tmp_path, "padded", [(suse_tree(tmp_path, uuid, compression="xz"), uuid, None, 0)],
                 holes={initrd: 250 * MiB})
    found = _validate_in_child(disk)
    initramfs = found["details"]["initramfs"]
    assert initramfs["problem"] is None and [p["compression"] for p in initramfs["parts"]] == ["xz"]
    assert found["details"]["boot_drivers"]["virtio_blk"] == "initramfs"  # the suse tree puts it there
    assert "guest-initramfs-unreadable" not in found["codes"]
    assert found["max_rss_kib"] < 256 * 1024  # less than the padding alone


def _in_child(code: str, timeout: float = 30) -> str:
    """``code`` run by a child Python under a deadline (a regular expression holds the GIL, so only a
    process can be stopped); returns what it printed."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=timeout, env=env,
                          check=True, text=True).stdout


@needs_image_tools
def test_hostile_network_configs_end_in_time(tmp_path: Path) -> None:
    """Issue 12 #13: a ``source`` glob of a dozen '*' (matched as '.*' regexes, over 120 s against a long
    name), a netplan line of 400,000 spaces (a key pattern with a lazy repeat before '\\s*:') and a
    netplan document nested 3,000 levels deep (recursion). The files next to them are still read."""
    uuid = new_uuid()
    tree = ubuntu_tree(tmp_path, uuid)
    glob = "*a" * 12 + "b"
    tree["/etc/network/interfaces"] = f"auto lo\niface lo inet loopback\nsource /etc/network/interfaces.d/{glob}\n"
    tree["/etc/network/interfaces.d/" + "a" * 200] = "iface eth9 inet dhcp\n"  # does not match: no 'b'
    tree["/etc/network/interfaces.d/" + "a" * 12 + "b"] = "auto eth1\niface eth1 inet static\n address 10.0.0.2/24\n"
    netplan = str(tree["/etc/netplan/50-cloud-init.yaml"])
    tree["/etc/netplan/50-cloud-init.yaml"] = netplan.replace("network:\n", "network:\n    x" + " " * 400_000 + "y\n")
    tree["/etc/netplan/60-deep.yaml"] = "".join(" " * i + f"k{i}:\n" for i in range(3000))
    found = _validate_in_child(_disk(tmp_path, "hostile", [(tree, uuid, "cloudimg-rootfs", 0)]))
    network = {(i["name"], i["source"], i["ipv4"]) for i in found["details"]["network"]}
    assert network == {("eth0", "/etc/netplan/50-cloud-init.yaml", "dhcp"),
                       ("eth1", "/etc/network/interfaces.d/aaaaaaaaaaaab", "static")}


@needs_image_tools
def test_grub_legacy_default_after_many_blank_lines(tmp_path: Path) -> None:
    """Issue 12 #13: GRUB legacy's ``default`` was searched with ``^\\s*default\\s*=?\\s*(\\d+)`` over the
    whole file, where ``\\s*`` spans lines: quadratic in a run of blank lines before another line."""
    uuid = new_uuid()
    tree = {p: c for p, c in suse_tree(tmp_path, uuid).items() if not p.startswith("/boot/grub2")}
    kernel = f"kernel /boot/vmlinuz-{SUSE_KERNEL} root=UUID={uuid}\ninitrd /boot/initrd-{SUSE_KERNEL}\n"
    tree["/boot/grub/menu.lst"] = "\n" * 400_000 + f"timeout 5\ndefault 1\ntitle first\n{kernel}title second\n{kernel}"
    found = _validate_in_child(_disk(tmp_path, "legacy", [(tree, uuid, None, 0)]))
    boot = found["details"]["boot"]
    assert boot["loader"] == "grub-legacy" and boot["default"]["title"] == "second"


@needs_image_tools
def test_selinux_config_without_a_policy_is_moot(tmp_path: Path) -> None:
    """Issue 13 #6: SELINUX=enforcing on a Debian-family system with no SELinux policy installed (its
    kernel loads AppArmor) boots normally: no finding. The bad CentOS above has a policy, and is reported."""
    uuid = new_uuid()
    tree = ubuntu_tree(tmp_path, uuid)
    tree["/etc/selinux/config"] = "SELINUX=enforcing\nSELINUXTYPE=default\n"
    report = diskimg.validate(_disk(tmp_path, "deb", [(tree, uuid, "cloudimg-rootfs", 0)]))
    assert not {"guest-selinux-enforcing", "guest-boot-recovery-mode"} & set(guest_findings(report))
    details = report.facts.guest["details"]
    assert (details["selinux"], details["selinux_loaded_by"]) == ("enforcing", None)


@needs_image_tools
@pytest.mark.parametrize("argument", ["single", "systemd.unit=emergency.target"])
def test_default_entry_in_recovery_mode_and_selinux_from_the_command_line(tmp_path: Path, argument: str) -> None:
    """Issue 13 #9: a default entry booting rescue or emergency mode (systemd's kernel-command-line(7))
    stops at a console no one can reach: a warning. Issue 13 #6: security=selinux loads SELinux even
    without a policy file in the image, so SELINUX=enforcing counts again."""
    uuid = new_uuid()
    tree = ubuntu_tree(tmp_path, uuid)
    tree["/etc/selinux/config"] = "SELINUX=enforcing\nSELINUXTYPE=default\n"
    grub = str(tree["/boot/grub/grub.cfg"])
    tree["/boot/grub/grub.cfg"] = grub.replace("ro console=tty1", f"ro security=selinux {argument} console=tty1")
    report = diskimg.validate(_disk(tmp_path, "rescue", [(tree, uuid, "cloudimg-rootfs", 0)]))
    found = guest_findings(report)
    recovery = found["guest-boot-recovery-mode"][0]
    assert recovery.severity.value == "warning" and recovery.evidence["value"] == [argument]
    assert recovery.evidence["entry"] == "Ubuntu"
    assert found["guest-selinux-enforcing"][0].evidence["loaded_by"] == "security=selinux"


@needs_image_tools
def test_fstab_resolves_across_the_disks_of_the_machine(tmp_path: Path) -> None:
    """Issue 13 #5: an fstab line naming a file system of the data disk (validate --system A --data B)
    was an error "on no volume of this disk"; it resolves across every disk of the machine."""
    uuid, data_uuid = new_uuid(), new_uuid()
    tree = ubuntu_tree(tmp_path, uuid)
    tree["/etc/fstab"] = str(tree["/etc/fstab"]) + f"UUID={data_uuid} /srv ext4 defaults 0 2\n"
    system = _disk(tmp_path, "system", [(tree, uuid, "cloudimg-rootfs", 0)])
    data = _disk(tmp_path, "data", [({"/readme": "data\n"}, data_uuid, None, 0)], size=GiB)
    alone = guest_findings(diskimg.validate(system))["guest-fstab-unresolved"]
    assert [f.evidence["spec"] for f in alone] == [f"UUID={data_uuid}"]
    assert "guest-fstab-unresolved" not in guest_findings(diskimg.validate(system=system, data=[data]))
    other = _disk(tmp_path, "other", [({"/readme": "other\n"}, new_uuid(), None, 0)], size=GiB)
    unresolved = guest_findings(diskimg.validate(system=system, data=[other]))["guest-fstab-unresolved"]
    assert "any disk of the machine" in unresolved[0].message


_NETPLAN_STATIC = ("# This file is generated from information provided by the datasource.  Changes\n"
                   "# to it will not persist across an instance reboot.\n"
                   "network:\n    version: 2\n    ethernets:\n        eth0:\n"
                   "            addresses: [192.168.1.10/24]\n            gateway4: 192.168.1.1\n")
_ENI_STATIC = ("# This file is generated from information provided by the datasource.  Changes\n"
               "# to it will not persist across an instance reboot.\n"
               "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet static\n    address 10.0.0.5/24\n")


@needs_image_tools
@pytest.mark.parametrize("layout", ["netplan", "eni", "netplan-network-disabled"])
def test_static_address_in_a_file_cloud_init_generates(tmp_path: Path, layout: str) -> None:
    """Issue 13 #7: a static address in a file cloud-init renders (50-cloud-init.yaml, interfaces.d/
    50-cloud-init, with cloud-init's own header) is replaced on the first boot while cloud-init's network
    configuration is on: a warning; with network: {config: disabled} it is the error it was."""
    uuid = new_uuid()
    tree = ubuntu_tree(tmp_path, uuid, netplan=_NETPLAN_STATIC)
    if layout == "eni":
        del tree["/etc/netplan/50-cloud-init.yaml"]
        tree["/etc/network/interfaces"] = "source /etc/network/interfaces.d/*\n"
        tree["/etc/network/interfaces.d/50-cloud-init"] = _ENI_STATIC
    disabled = "/etc/cloud/cloud.cfg.d/99-disable-network-config.cfg"
    if layout == "netplan-network-disabled":
        tree[disabled] = "network: {config: disabled}\n"
    found = guest_findings(diskimg.validate(_disk(tmp_path, layout, [(tree, uuid, "cloudimg-rootfs", 0)])))
    source = "/etc/network/interfaces.d/50-cloud-init" if layout == "eni" else "/etc/netplan/50-cloud-init.yaml"
    if layout == "netplan-network-disabled":
        assert "guest-static-ip-cloud-init" not in found
        error = found["guest-static-ip"][0]
        assert error.severity.value == "error" and error.evidence["cloud_init_network_disabled"] == disabled
    else:
        assert "guest-static-ip" not in found
        warning = found["guest-static-ip-cloud-init"][0]
        assert warning.severity.value == "warning" and warning.evidence["file"] == source


# -- root= and fstab resolved as the instance's initramfs and udev will ---------------------------------

#: fixed-size holes in grub.cfg and /etc/fstab, overwritten in the disk for each case (whitespace ends a word)
ROOT_SLOT, FSTAB_SLOT = "root=" + "#" * 90, "@" * 90


@pytest.fixture(scope="module")
def slot_disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A GPT Ubuntu disk whose default entry's root= and one fstab line can be rewritten in place:
    (disk, the root file system's UUID given to mkfs, partition 1's GUID as sgdisk reports it)."""
    if any(shutil.which(t) is None for t in IMAGE_TOOLS):
        pytest.skip("needs " + ", ".join(IMAGE_TOOLS))
    tmp = tmp_path_factory.mktemp("slots")
    uuid = new_uuid()
    tree = ubuntu_tree(tmp, uuid)
    tree["/boot/grub/grub.cfg"] = str(tree["/boot/grub/grub.cfg"]).replace("root=LABEL=cloudimg-rootfs ro console",
                                                                           f"{ROOT_SLOT} ro console")
    tree["/etc/fstab"] = str(tree["/etc/fstab"]) + f"{FSTAB_SLOT} /data ext4 defaults 0 2\n"
    disk = _disk(tmp, "d", [(tree, uuid, "cloudimg-rootfs", 0)], scheme="gpt")
    subprocess.run(["sgdisk", "-c", "1:rootpart", str(disk)], check=True, capture_output=True)
    info = subprocess.run(["sgdisk", "-i", "1", str(disk)], check=True, capture_output=True, text=True).stdout
    guid = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Partition unique GUID"))
    return disk, uuid, guid


def fill_slot(disk: Path, slot: str, value: str) -> None:
    """Overwrite the slot (in the root file system's data, within the first 128 MiB) with ``value``."""
    with open(disk, "r+b") as image:
        data = image.read(128 * MiB)
        at = data.find(slot.encode())
        assert at > 0 and data.find(slot.encode(), at + 1) < 0
        image.seek(at)
        image.write(value.ljust(len(slot)).encode())


@pytest.mark.parametrize("root, names_nothing", [
    ("LABEL=cloudimg-rootfs", False), ("UUID={uuid}", False), ("UUID=0b7d1c7e-2d4c-4c2e-9a55-000000000000", True),
    ("PARTUUID={guid}", False), ("PARTUUID=0b7d1c7e-2d4c-4c2e-9a55-000000000000", True),
    ("PARTLABEL=rootpart", False), ("PARTLABEL=otherpart", True),
    ("/dev/disk/by-uuid/{uuid}", False), ("/dev/disk/by-partuuid/{guid}", False), ("/dev/disk/by-label/other", True),
    ("/dev/vda1", False), ("/dev/nvme0n1p1", False), ("/dev/xvda1", False), ("/dev/vda7", True),
    ("/dev/loop0p1", True), ("/dev/nbd0p1", True), ("/dev/mapper/vg0-root", True), ("/dev/vg0/root", True),
    ("/dev/md0", True), ("/dev/sda1", True), ("/dev/vdb1", True), ("/dev/rootfs-garbage", True),
])
def test_root_resolved_as_the_initramfs_will(slot_disk: tuple[Path, str, str], tmp_path: Path, root: str,
                                             names_nothing: bool) -> None:
    """Issue 13: update-grub in a chroot wrote root=/dev/loop0p1 and the boot stopped at 'ALERT! /dev/loop0p1
    does not exist'. The oracle: the UUID given to mkfs, the GUID and name sgdisk set, the instance's
    virtio/NVMe/Xen names of partition 1."""
    source, uuid, guid = slot_disk
    disk = tmp_path / "d.raw"
    subprocess.run(["cp", "--sparse=always", str(source), str(disk)], check=True)
    root = root.format(uuid=uuid, guid=guid.lower())
    fill_slot(disk, ROOT_SLOT, f"root={root}")
    fill_slot(disk, FSTAB_SLOT, root.replace("root", "data") if root.startswith("/dev/") else "tmpfs")
    report = diskimg.validate(disk)
    broken = [f for f in report.findings if f.code == "guest-boot-entry-broken"]
    assert [f.evidence["value"] for f in broken] == ([root] if names_nothing else [])
    if names_nothing:
        assert not report.importable and broken[0].severity.value == "error"
    if root.startswith("/dev/") and not root.startswith("/dev/disk/"):
        # the same name (another volume) in fstab, through the same resolver
        fstab = [f for f in report.findings if f.code == "guest-fstab-unresolved"]
        assert bool(fstab) == names_nothing, [f.message for f in report.findings]


# -- cloud-init installed but not running; sshd without host keys ------------------------------------------

CLOUD_INIT_WANTS = "/etc/systemd/system/multi-user.target.wants/cloud-init.service"


def _no_cloud_init(tree: dict) -> None:
    for path in cloud_init("/usr/lib/python3/dist-packages", "23.3.3", None):
        tree.pop(path, None)


def _kernel_args(tree: dict, args: str) -> None:
    tree["/boot/grub/grub.cfg"] = str(tree["/boot/grub/grub.cfg"]).replace("root=LABEL=cloudimg-rootfs ro console",
                                                                           f"root=LABEL=cloudimg-rootfs ro {args} console")


CLOUD_INIT_CASES = {
    "enabled": (lambda tree: None, None),
    "disabled-file": (lambda tree: tree.update({"/etc/cloud/cloud-init.disabled": ""}), "cloud-init.disabled"),
    "masked": (lambda tree: tree.update({"/etc/systemd/system/cloud-init.service": Link("/dev/null")}), "masked"),
    "not-enabled": (lambda tree: tree.pop(CLOUD_INIT_WANTS), "not enabled"),
    "enabled-by-preset": (lambda tree: (tree.pop(CLOUD_INIT_WANTS), tree.update(
        {"/usr/lib/systemd/system-preset/90-default.preset": "enable cloud-init*.service\ndisable *\n"})), None),
    "disabled-by-preset": (lambda tree: (tree.pop(CLOUD_INIT_WANTS), tree.update(
        {"/usr/lib/systemd/system-preset/99-default.preset": "disable *\n"})), "not enabled"),
    "kernel-command-line": (lambda tree: _kernel_args(tree, "cloud-init=disabled"), "cloud-init=disabled"),
    "nocloud-only": (lambda tree: tree.update({"/etc/cloud/cloud.cfg.d/90_dpkg.cfg": "datasource_list: [ NoCloud, None ]\n"}),
                     "AliYun"),
    "aliyun-listed": (lambda tree: tree.update({"/etc/cloud/cloud.cfg.d/90_dpkg.cfg": "datasource_list: [ AliYun, None ]\n"}),
                      None),
}


@needs_image_tools
@pytest.mark.parametrize("case", list(CLOUD_INIT_CASES))
def test_cloud_init_installed_but_not_running(tmp_path: Path, case: str) -> None:
    change, reason = CLOUD_INIT_CASES[case]
    uuid = new_uuid()
    tree = ubuntu_tree(tmp_path, uuid)
    change(tree)
    report = diskimg.validate(_disk(tmp_path, "ci", [(tree, uuid, "cloudimg-rootfs", 0)]))
    found = guest_findings(report).get("guest-cloud-init-disabled", [])
    assert not report.find("guest-cloud-init-missing")
    if reason is None:
        assert not found
    else:
        assert len(found) == 1 and found[0].severity.value == "warning" and reason in found[0].message


SSH_CASES = {  # tree change, whether sshd will lack host keys at boot
    "no-cloud-init-no-keys": (_no_cloud_init, True),
    "no-cloud-init-keys": (lambda tree: (_no_cloud_init(tree), tree.update(
        {"/etc/ssh/ssh_host_ed25519_key": "-----BEGIN OPENSSH PRIVATE KEY-----\n"})), False),
    "no-cloud-init-rhel-keygen": (lambda tree: (_no_cloud_init(tree), tree.update(
        {"/usr/lib/systemd/system/sshd-keygen@.service": "[Unit]\n"})), False),
    "cloud-init-makes-keys": (lambda tree: None, False),
    "cloud-init-disabled-no-keys": (lambda tree: tree.update({"/etc/cloud/cloud-init.disabled": ""}), True),
}


@needs_image_tools
@pytest.mark.parametrize("case", list(SSH_CASES))
def test_sshd_without_host_keys(tmp_path: Path, case: str) -> None:
    """Debian's ssh.service generates no host keys: without them (and without cloud-init) sshd fails."""
    change, fails = SSH_CASES[case]
    uuid = new_uuid()
    tree = ubuntu_tree(tmp_path, uuid)
    tree.update({"/usr/sbin/sshd": elf_header(ELF_X86_64), "/etc/ssh/sshd_config": "PermitRootLogin yes\n"})
    change(tree)
    report = diskimg.validate(_disk(tmp_path, "ssh", [(tree, uuid, "cloudimg-rootfs", 0)]))
    found = report.find("guest-ssh-host-keys-missing")
    assert bool(found) == fails
    if fails:
        assert found[0].severity.value == "warning" and found[0].evidence["file"] == "/usr/sbin/sshd"


def test_containers_and_media_in_device_specs() -> None:
    """LVM, LUKS and md volumes are judged only when the disk holds no such container; optical and floppy
    drives and the kernel's /dev/root alias are not judged (fstab's noauto media lines)."""
    plain = GuestDisk(None, [GuestVolume("partition 1", 1, MiB, MiB, FileSystem("ext4"))])  # type: ignore[arg-type]
    lvm = GuestDisk(None, [GuestVolume("partition 1", 1, MiB, MiB, FileSystem("lvm2"))])  # type: ignore[arg-type]
    md = GuestDisk(None, [GuestVolume("partition 1", 1, MiB, MiB, FileSystem("md"))])  # type: ignore[arg-type]
    for spec in ("/dev/mapper/vg0-root", "/dev/vg0/root", "/dev/dm-0"):
        assert (plain.resolve(spec).status, lvm.resolve(spec).status) == ("missing", "unassembled")
    for spec in ("/dev/md0", "/dev/md/root", "/dev/md126p1"):
        assert (plain.resolve(spec).status, md.resolve(spec).status) == ("missing", "unassembled")
    for spec in ("/dev/sr0", "/dev/cdrom", "/dev/fd0", "/dev/root", "tmpfs", "/dev/disk/by-id/virtio-abc"):
        assert plain.resolve(spec).status == "unknown"
    assert plain.resolve("/dev/vda1").volume is plain.volumes[0]
    assert "data disk" in plain.resolve("/dev/vdb1").reason
