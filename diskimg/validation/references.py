"""The public documents the rules come from, by the tags the rule catalogue cites them with.

A rule's ``source`` is a maintainer's note that points into the project's reference notes
(``§1.3 P2 (A-BOOT)``); users do not have those notes, so what they are shown is the public
document each tag stands for, with its title and address (:func:`references`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ALIBABA_MIRROR = "https://github.com/AlibabaCloudDocs/ecs/blob/master/"


@dataclass(frozen=True)
class Reference:
    title: str
    url: str

    def to_dict(self) -> dict[str, str]:
        return {"title": self.title, "url": self.url}


#: a source tag -> the document it names
DOCUMENTS: dict[str, Reference] = {
    "A-INSTR": Reference("Alibaba Cloud ECS: Instructions for importing images",
                         "https://www.alibabacloud.com/help/en/ecs/user-guide/instructions-for-importing-images"),
    "A-INSTR-CN": Reference(
        "Alibaba Cloud ECS: 导入镜像必读 (instructions for importing images, Chinese edition)",
        _ALIBABA_MIRROR + "cn.zh-CN/%E9%95%9C%E5%83%8F/%E8%87%AA%E5%AE%9A%E4%B9%89%E9%95%9C%E5%83%8F/"
        "%E5%AF%BC%E5%85%A5%E9%95%9C%E5%83%8F/%E5%AF%BC%E5%85%A5%E9%95%9C%E5%83%8F%E5%BF%85%E8%AF%BB.md"),
    "A-IMPORT": Reference("Alibaba Cloud ECS: Import a custom image",
                          "https://www.alibabacloud.com/help/en/ecs/user-guide/import-a-custom-image"),
    "A-API-IMP": Reference(
        "Alibaba Cloud ECS API reference: ImportImage",
        "https://www.alibabacloud.com/help/en/ecs/developer-reference/api-ecs-2014-05-26-importimage"),
    "A-BOOT": Reference("Alibaba Cloud ECS: Instance boot modes",
                        "https://www.alibabacloud.com/help/en/ecs/user-guide/instance-startup-mode"),
    "A-CHECK": Reference("Alibaba Cloud ECS: Detect custom images and repair them (image check)",
                         "https://www.alibabacloud.com/help/en/ecs/user-guide/detect-custom-images-and-repair"),
    "A-TOOL": Reference("Alibaba Cloud ECS: Image compliance tool",
                        _ALIBABA_MIRROR + "intl.en-US/Images/Custom%20image/Import%20images/"
                        "Image%20compliance%20tool.md"),
    "A-VIRTIO": Reference("Alibaba Cloud ECS: Install a virtio driver",
                          _ALIBABA_MIRROR + "intl.en-US/Images/Custom%20image/Import%20images/"
                          "Install%20a%20virtio%20driver.md"),
    "A-CINIT": Reference("Alibaba Cloud ECS: Install cloud-init", "https://help.aliyun.com/document_detail/57803.html"),
    "A-SPEC": Reference("Alibaba Cloud ECS: Alibaba Cloud image specification (Linux)",
                        "https://www.alibabacloud.com/help/id/ecs/user-guide/cloud-marketplace-mirror-specification"),
    "A-NVME": Reference(
        "Alibaba Cloud ECS: Adapt Linux custom images to NVMe system disks",
        "https://www.alibabacloud.com/help/id/ecs/adapt-linux-custom-images-to-nvme-based-system-disks"),
    "A-WIN-NVME": Reference(
        "Alibaba Cloud ECS: Windows instance fails to start with an INACCESSIBLE_BOOT_DEVICE blue screen",
        "https://www.alibabacloud.com/help/en/ecs/support/windows-instance-fails-to-start-with-an-inaccessible-"
        "boot-device-blue-screen-after-cross-generation-change"),
    "qcow2 spec": Reference("QEMU: the qcow2 image format specification",
                            "https://github.com/qemu/qemu/blob/master/docs/interop/qcow2.txt"),
    "UEFI spec": Reference("UEFI Specification (GUID Partition Table; EFI system partition)",
                           "https://uefi.org/specifications"),
    "efi.c": Reference("Linux kernel: GPT partition parsing (block/partitions/efi.c)",
                       "https://github.com/torvalds/linux/blob/master/block/partitions/efi.c"),
    "qemu-img check": Reference("QEMU: qemu-img documentation (check)",
                                "https://www.qemu.org/docs/master/tools/qemu-img.html"),
    "AWS: 'Footers": Reference("AWS VM Import/Export: troubleshooting",
                               "https://docs.aws.amazon.com/vm-import/latest/userguide/vmimport-troubleshooting.html"),
    "AWS: UEFI": Reference("AWS VM Import/Export: prerequisites",
                           "https://docs.aws.amazon.com/vm-import/latest/userguide/prerequisites.html"),
    "GCE:": Reference("Google Compute Engine: Importing virtual disks",
                      "https://cloud.google.com/compute/docs/import/importing-virtual-disks"),
    "Huawei IMS": Reference("Open Telekom Cloud (Huawei) IMS user guide: preparing a Linux image",
                            "https://docs.otc.t-systems.com/en-us/usermanual/ims/en-us_topic_0030713198.html"),
    "Oracle G03": Reference(
        "Oracle Cloud Marketplace: image guidelines (G03)",
        "https://docs.cloud.nricloud.jp/en-us/iaas/Content/Marketplace/app-publisher-guidelines-images.htm"),
}

# longest first: A-INSTR-CN is not taken for A-INSTR
_TAGS = re.compile("|".join(re.escape(tag) + (r"\b" if tag[-1].isalnum() else "")
                            for tag in sorted(DOCUMENTS, key=len, reverse=True)))


def references(source: str) -> list[Reference]:
    """The public documents a rule's source note cites, in the order it cites them."""
    found: list[Reference] = []
    for match in _TAGS.finditer(source):
        document = DOCUMENTS[match.group()]
        if document not in found:
            found.append(document)
    return found


def is_inference(source: str) -> bool:
    """Whether the rule is diskimg's inference from its documents rather than stated by them."""
    return "inference" in source
