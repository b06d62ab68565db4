"""Tiny datasets in the official annotation layouts, written into a folder by plain functions.

Each ``write_<format>(root)`` writes only annotation files (readers never open images) and
returns the facts a test needs: the files written and the expected row count. The data rows
of DeepFashion lists start on line 3 (line 1 is the count, line 2 the column names).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

FIRST_DATA_LINE = 3  # DeepFashion lists: count, header, then rows


def write_text(path: Path, lines: Iterable[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_counted_list(path: Path, header: str | None, rows: list[str]) -> Path:
    """A DeepFashion list: row count, column names, rows (``header=None``: no names line)."""
    return write_text(path, [str(len(rows)), *([header] if header is not None else []), *rows])


def replace_line(path: Path, line: int, text: str) -> Path:
    """Overwrite the 1-based ``line`` of a text file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[line - 1] = text
    return write_text(path, lines)


# ---- DeepFashion consumer-to-shop ----------------------------------------------------------

C2S_PAIRS = [
    "img/TOPS/Summer_Wear/id_00000001/comsumer_01.jpg img/TOPS/Summer_Wear/id_00000001/shop_01.jpg id_00000001 train",
    "img/TOPS/Summer_Wear/id_00000001/comsumer_02.jpg img/TOPS/Summer_Wear/id_00000001/shop_01.jpg id_00000001 train",
    "img/DRESSES/Dress/id_00000002/comsumer_01.jpg img/DRESSES/Dress/id_00000002/shop_01.jpg id_00000002 val",
    "img/TROUSERS/Pants/id_00000003/comsumer_01.jpg img/TROUSERS/Pants/id_00000003/shop_01.jpg id_00000003 test",
    "img/TROUSERS/Pants/id_00000003/comsumer_01.jpg img/TROUSERS/Pants/id_00000003/shop_02.jpg id_00000003 test",
    "img/TOPS/Blouse/id_00000004/comsumer_01.jpg img/TOPS/Blouse/id_00000004/shop_01.jpg id_00000004 test",
]
# image, clothes_type, source_type (1 shop, 2 consumer), box; id_00000004's shop photo has none
C2S_BOXES = [
    "img/TOPS/Summer_Wear/id_00000001/comsumer_01.jpg 1 2 10 20 110 220",
    "img/TOPS/Summer_Wear/id_00000001/shop_01.jpg     1 1 0 0 300 280",
    "img/TOPS/Summer_Wear/id_00000001/comsumer_02.jpg 1 2 5 6 7 8",
    "img/DRESSES/Dress/id_00000002/comsumer_01.jpg 3 2 1 2 3 4",
    "img/DRESSES/Dress/id_00000002/shop_01.jpg 3 1 11 12 13 14",
    "img/TROUSERS/Pants/id_00000003/comsumer_01.jpg 2 2 50 60 150 260",
    "img/TROUSERS/Pants/id_00000003/shop_01.jpg 2 1 0 0 100 100",
    "img/TROUSERS/Pants/id_00000003/shop_02.jpg 2 1 1.5 2.5 99.5 98",
    "img/TOPS/Blouse/id_00000004/comsumer_01.jpg 1 2 3 3 30 30",
    "img/TOPS/Blouse/id_00000099/shop_01.jpg 1 1 0 0 10 10",  # in no pair: ignored
]
C2S_ATTRIBUTE_NAMES = ["短袖 short sleeve 1", "长袖 long sleeve 1", "红色 red 2", "条纹 stripe 3", "修身 slim fit 4"]
C2S_ITEM_ATTRIBUTES = [
    "id_00000001  1 -1  1 -1  0",
    "id_00000002 -1 -1 -1 -1 -1",
    "id_00000003 -1  1 -1  1  1",
]


def write_deepfashion_c2s(root: Path) -> dict[str, Any]:
    root = Path(root)
    files = {
        "partition": write_counted_list(root / "Eval" / "list_eval_partition.txt",
                                        "image_pair_name_1 image_pair_name_2 item_id evaluation_status", C2S_PAIRS),
        "bbox": write_counted_list(root / "Anno" / "list_bbox_consumer2shop.txt",
                                   "image_name clothes_type source_type x_1 y_1 x_2 y_2", C2S_BOXES),
        "items": write_counted_list(root / "Anno" / "list_item_consumer2shop.txt", None,
                                    [f"id_0000000{i}" for i in range(1, 6)]),
        "attribute_names": write_counted_list(root / "Anno" / "list_attr_cloth.txt",
                                              "attribute_name attribute_type", C2S_ATTRIBUTE_NAMES),
        "item_attributes": write_counted_list(root / "Anno" / "list_attr_items.txt", "item_id attribute_labels",
                                              C2S_ITEM_ATTRIBUTES),
    }
    return {"root": root, "files": files, "rows": 10, "items": ["id_00000001", "id_00000002", "id_00000003",
                                                                 "id_00000004"]}


# ---- DeepFashion in-shop ---------------------------------------------------------------------

INSHOP_PARTITION = [
    "img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train",
    "img/WOMEN/Dresses/id_00000002/02_2_side.jpg id_00000002 train",
    "img/MEN/Denim/id_00000080/01_1_front.jpg id_00000080 query",
    "img/MEN/Denim/id_00000080/01_2_side.jpg id_00000080 gallery",
    "img/MEN/Denim/id_00000080/01_7_additional.jpg id_00000080 gallery",
    "img/WOMEN/Blouses_Shirts/id_00000100/03_1_front.jpg id_00000100 query",
    "img/WOMEN/Blouses_Shirts/id_00000100/03_4_full.jpg id_00000100 gallery",
]
# image, clothes_type, pose_type, box; 03_4_full has none
INSHOP_BOXES = [
    "img/WOMEN/Dresses/id_00000002/02_1_front.jpg 3 1 50 20 200 250",
    "img/WOMEN/Dresses/id_00000002/02_2_side.jpg 3 2 55 25 195 245",
    "img/MEN/Denim/id_00000080/01_1_front.jpg 2 1 60 100 190 256",
    "img/MEN/Denim/id_00000080/01_2_side.jpg 2 2 70 100 180 256",
    "img/MEN/Denim/id_00000080/01_7_additional.jpg 2 6 0 0 256 256",
    "img/WOMEN/Blouses_Shirts/id_00000100/03_1_front.jpg 1 5 40 30 220 200",
]
INSHOP_ATTRIBUTE_NAMES = ["black", "denim", "floral print", "long sleeve"]
INSHOP_ITEM_ATTRIBUTES = [
    "id_00000002 -1 -1  1  1",
    "id_00000080  1  1 -1 -1",
    "id_00000100 -1 -1 -1  0",
]


def write_deepfashion_inshop(root: Path) -> dict[str, Any]:
    root = Path(root)
    files = {
        "partition": write_counted_list(root / "Eval" / "list_eval_partition.txt",
                                        "image_name item_id evaluation_status", INSHOP_PARTITION),
        "bbox": write_counted_list(root / "Anno" / "list_bbox_inshop.txt",
                                   "image_name clothes_type pose_type x_1 y_1 x_2 y_2", INSHOP_BOXES),
        "items": write_counted_list(root / "Anno" / "list_item_inshop.txt", None,
                                    ["id_00000002", "id_00000080", "id_00000100"]),
        "attribute_names": write_counted_list(root / "Anno" / "list_attr_cloth.txt", "attribute_name",
                                              INSHOP_ATTRIBUTE_NAMES),
        "item_attributes": write_counted_list(root / "Anno" / "list_attr_items.txt", "item_id attribute_labels",
                                              INSHOP_ITEM_ATTRIBUTES),
    }
    return {"root": root, "files": files, "rows": 7, "items": ["id_00000002", "id_00000080", "id_00000100"]}


# ---- DeepFashion category and attribute prediction ---------------------------------------------

ATTR_CATEGORIES = ["Blouse                       1", "Jeans                        2",
                   "Dress                        3"]
# names padded as in the release; "long sleeve" and "v neck" hold spaces
ATTR_NAMES = ["floral                       1", "cotton                       2",
              "a-line                       3", "long sleeve                  4",
              "v neck                       4", "boho                         5"]
ATTR_IMAGES = [
    "img/Sheer_Pleated-Front_Blouse/img_00000001.jpg",
    "img/Sheer_Pleated-Front_Blouse/img_00000002.jpg",
    "img/Classic_Skinny_Jeans/img_00000001.jpg",
    "img/Floral_A-Line_Dress/img_00000001.jpg",
    "img/Floral_A-Line_Dress/img_00000002.jpg",
    "img/Boho_V-Neck_Dress/img_00000001.jpg",
]
ATTR_STATUS = ["train", "train", "val", "test", "test", "train"]
ATTR_CATEGORY_LABELS = ["1", "1", "2", "3", "3", "3"]
ATTR_LABELS = [  # floral cotton a-line long-sleeve v-neck boho
    "-1  1 -1  1 -1 -1",
    "-1 -1 -1 -1 -1 -1",
    "-1  1 -1 -1 -1 -1",
    " 1 -1  1 -1 -1 -1",
    " 1  0  1  1 -1 -1",
    "-1 -1 -1 -1  1  1",
]


def write_deepfashion_attributes(root: Path, annotation_dir: str = "Anno") -> dict[str, Any]:
    root = Path(root)
    anno = root / annotation_dir
    extra = "img/Not_In_Partition/img_00000001.jpg"
    files = {
        "partition": write_counted_list(root / "Eval" / "list_eval_partition.txt", "image_name evaluation_status",
                                        [f"{i} {s}" for i, s in zip(ATTR_IMAGES, ATTR_STATUS)]),
        "categories": write_counted_list(anno / "list_category_cloth.txt", "category_name  category_type",
                                         ATTR_CATEGORIES),
        "category_labels": write_counted_list(anno / "list_category_img.txt", "image_name  category_label",
                                              [f"{i} {c}" for i, c in zip(ATTR_IMAGES, ATTR_CATEGORY_LABELS)]
                                              + [f"{extra} 2"]),
        "attribute_names": write_counted_list(anno / "list_attr_cloth.txt", "attribute_name  attribute_type",
                                              ATTR_NAMES),
        "attribute_labels": write_counted_list(anno / "list_attr_img.txt", "image_name  attribute_labels",
                                               [f"{i} {labels}" for i, labels in zip(ATTR_IMAGES, ATTR_LABELS)]
                                               + [f"{extra} 1 1 1 1 1 1"]),
        "bbox": write_counted_list(anno / "list_bbox.txt", "image_name  x_1  y_1  x_2  y_2",
                                   [f"{image} {n} {n + 1} {n + 100} {n + 200}"
                                    for n, image in enumerate(ATTR_IMAGES[:5])]),
    }
    return {"root": root, "files": files, "rows": 6,
            "items": ["Boho_V-Neck_Dress", "Classic_Skinny_Jeans", "Floral_A-Line_Dress",
                      "Sheer_Pleated-Front_Blouse"]}


# ---- Street2Shop ---------------------------------------------------------------------------

def _box(left: float, top: float, width: float, height: float) -> dict[str, float]:
    return {"left": left, "top": top, "width": width, "height": height}


STREET2SHOP = {
    "retrieval_dresses.json": [{"photo": 11, "product": 100}, {"photo": 12, "product": 100},
                               {"photo": 13, "product": 101}, {"photo": 14, "product": 102}],
    "train_pairs_dresses.json": [{"photo": 1, "product": 101, "bbox": _box(10, 20, 30, 40)}],
    "test_pairs_dresses.json": [{"photo": 2, "product": 100, "bbox": _box(0, 0, 50, 60)},
                                {"photo": 2, "product": 101, "bbox": _box(60, 5, 20.5, 30)}],
    "retrieval_skirts.json": [{"photo": 21, "product": 200}, {"photo": 22, "product": 201}],
    "train_pairs_skirts.json": [{"photo": 3, "product": 200, "bbox": _box(1, 2, 3, 4)},
                                {"photo": 3, "product": 200, "bbox": _box(1, 2, 3, 4)}],  # verbatim repeat
    "test_pairs_skirts.json": [],
}


def write_street2shop(root: Path) -> dict[str, Any]:
    """Product 101 is in a train and a test pair, 102 and 201 in no pair, 200 only in train."""
    root = Path(root)
    meta = root / "meta" / "json"
    meta.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, entries in STREET2SHOP.items():
        files[name] = meta / name
        files[name].write_text(json.dumps(entries, indent=1), encoding="utf-8")
    return {"root": root, "files": files, "rows": 10, "categories": ["dresses", "skirts"]}


# ---- FashionAI ----------------------------------------------------------------------------

FASHIONAI_LABELS = [
    "Images/collar_design_labels/a1.jpg,collar_design_labels,nnynn",
    "Images/collar_design_labels/a2.jpg,collar_design_labels,ynnnn",
    "Images/skirt_length_labels/b1.jpg,skirt_length_labels,nnnmyn",
    "Images/neckline_design_labels/c1.jpg,neckline_design_labels,nnnnnnnnyn",
    "Images/sleeve_length_labels/d1.jpg,sleeve_length_labels,nnnnnnnny",
    "Images/sleeve_length_labels/d1.jpg,coat_length_labels,nnynnnnn",
]


def write_fashionai(root: Path, folder: str = "") -> dict[str, Any]:
    """``label.csv`` in ``root/<folder>/Annotations`` (``folder`` "" , "base" or "web")."""
    root = Path(root)
    base = root / folder if folder else root
    files = {"labels": write_text(base / "Annotations" / "label.csv", FASHIONAI_LABELS)}
    return {"root": root, "files": files, "rows": 5}


# ---- ASEN split lists (DARN, FashionAI) --------------------------------------------------------

ASEN_FILES = {
    "filenames_train.txt": ["pic/t0.jpg", "pic/t1.jpg", "pic/t2.jpg", "pic/unlabelled.jpg"],
    # image 0: attributes 0 and 2 on one line; image 2: attribute 8 on its own line, twice
    "label_train.txt": ["0 0 3 2 54", "1 7 0", "2 8 16", "2 8 16"],
    "filenames_valid.txt": ["pic/v0.jpg", "pic/v1.jpg"],
    "query_valid.txt": ["0 1 2"],
    "candidate_valid.txt": ["1 1 2", "0 3 6"],
    "filenames_test.txt": ["pic/q0.jpg", "pic/c0.jpg", "pic/c1.jpg", "pic/both.jpg"],
    "query_test.txt": ["0 4 27", "3 5 1"],
    "candidate_test.txt": ["1 4 27", "2 4 0", "3 6 25"],
}


def write_asen_lists(root: Path, files: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """ASEN's split lists; with the default lists and the DARN attributes the table has 3 train,
    2 val, 2 query and 3 gallery rows (``pic/both.jpg`` is a query and a gallery image)."""
    root = Path(root)
    written = {name: write_text(root / name, lines) for name, lines in (files or ASEN_FILES).items()}
    return {"root": root, "files": written, "rows": 10}


# ASEN's DeepFashion lists with multi-valued attribute types: an image listed with two textures
# on one line (train image 0), on two lines (train image 1, query 0, candidate 0) and with a
# repeated pair; shape stays single-valued everywhere.
DEEPFASHION_ASEN_MULTIVALUED = {
    "filenames_train.txt": ["img/Floral_Striped_Blouse/img_00000001.jpg", "img/Floral_Striped_Blouse/img_00000002.jpg",
                            "img/Denim_Shorts/img_00000001.jpg"],
    "label_train.txt": ["0 0 3 0 7 4 1", "1 0 7", "1 0 12", "1 2 5", "2 0 3", "0 0 3"],
    "filenames_test.txt": ["img/Q/img_00000001.jpg", "img/A/img_00000001.jpg", "img/B/img_00000001.jpg",
                           "img/C/img_00000001.jpg", "img/D/img_00000001.jpg"],
    # query 0: texture {3, 7}; query 1: style {2}
    "query_test.txt": ["0 0 3", "0 0 7", "1 4 2"],
    # B: texture {7, 12}; C: texture {3}, style {2}; D: texture {9}, style {2, 6}
    "candidate_test.txt": ["2 0 7", "2 0 12", "3 0 3", "4 0 9", "3 4 2", "4 4 2 4 6"],
}


def write_deepfashion_asen_multivalued(root: Path) -> dict[str, Any]:
    """:data:`DEEPFASHION_ASEN_MULTIVALUED` in ``root/split``: 3 train, 2 query and 3 gallery rows;
    texture and style are multi-valued, shape is not."""
    written = write_asen_lists(Path(root) / "split", DEEPFASHION_ASEN_MULTIVALUED)["files"]
    return {"root": Path(root), "files": written, "rows": 8}


FASHIONAI_META = {
    "ATTRIBUTES": ["skirt_length", "collar_design"],
    "ATTRIBUTES_NUM": {"skirt_length": 6, "collar_design": 5},
    "ATTRIBUTES_VALUES": {
        "skirt_length": ["Invisible", "Short Length", "Knee Length", "Midi Length", "Ankle Length", "Floor Length"],
        "collar_design": ["Invisible", "Shirt Collar", "Peter Pan", "Puritan Collar", "Rib Collar"],
    },
}


def write_asen_fashionai(root: Path, split_dir: str = "split") -> dict[str, Any]:
    """ASEN lists for FashionAI under ``root/split_dir`` with a two-attribute ``meta.json``."""
    root = Path(root)
    folder = root / split_dir
    written = write_asen_lists(folder, {
        "filenames_train.txt": ["train/Images/skirt_length_labels/s0.jpg", "train/Images/collar_design_labels/k0.jpg"],
        "label_train.txt": ["0 0 4", "1 1 2"],
        "filenames_test.txt": ["test/Images/skirt_length_labels/s1.jpg", "test/Images/collar_design_labels/k1.jpg"],
        "query_test.txt": ["0 0 5"],
        "candidate_test.txt": ["1 1 0"],
    })["files"]
    written["meta"] = folder / "meta.json"
    written["meta"].write_text(json.dumps(FASHIONAI_META), encoding="utf-8")
    return {"root": root, "files": written, "rows": 4}
