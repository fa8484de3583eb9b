"""Device check of the trainer on one CUDA GPU, on synthetic data written in the official formats: bf16
autocast, Triton vs torch loss backends on a trained teacher's logits, CIFAR zoo models, torchvision ImageNet
models through an ImageFolder tree, TensorBoard events. Run: ``python -m train.gpu_check OUT_DIR`` (about a
minute); distillation on real data: ``python -m train demo device=cuda threads=0``."""
import json
import os
import sys
import time

import torch

from . import checkpoint, engine
from .models import build_model
from .testing import run_cfg, synthetic_images, write_cifar100, write_fashion_mnist


def write_image_folder(root, classes=4, per_class=16, size=64):
    from PIL import Image

    for split in ("train", "val"):
        images, labels = synthetic_images(classes * per_class, classes, (3, size, size), seed=int(split == "val"))
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = os.path.join(root, split, f"class{int(label)}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i}.png"))
    return root


def compare_backends(results, teacher_path):
    """The fused loss and its gradient, Triton vs torch reference, on logits of the trained (confident) teacher
    and of a fresh student, in float32 and bfloat16."""
    import ttm_kernels

    from .testing import synthetic_images

    teacher = build_model("cnn_teacher", 10, (1, 28, 28))
    teacher.load_state_dict(torch.load(teacher_path)["model"])
    images, labels = synthetic_images(256, 10, (1, 28, 28))
    x = ((images.float() / 255 - 0.286) / 0.353).cuda()
    with torch.no_grad():
        t_logits = teacher.cuda().eval()(x)
        s_logits = build_model("cnn_student", 10, (1, 28, 28)).cuda().eval()(x)
    print("teacher logit range", float(t_logits.min()), float(t_logits.max()), flush=True)
    fns = {"kd": ttm_kernels.fused_kd_loss, "ttm": ttm_kernels.fused_ttm_loss, "wttm": ttm_kernels.fused_wttm_loss}
    for dtype in (torch.float32, torch.bfloat16):
        for name, fn in fns.items():
            out = {}
            for backend in ("triton", "torch"):
                z = s_logits.to(dtype).clone().requires_grad_()
                loss, parts = fn(z, t_logits.to(dtype), labels.cuda(), backend=backend, return_components=True)
                loss.backward()
                out[backend] = (loss.float(), z.grad.float(), parts)
            key = f"loss_{name}_{str(dtype).split('.')[-1]}"
            results[key] = {b: {"loss": float(v[0]), "kl": float(v[2].kl), "ce": float(v[2].ce),
                                "weight": float(v[2].weight), "grad_finite": bool(torch.isfinite(v[1]).all())}
                            for b, v in out.items()}
            results[key]["max_grad_diff"] = float((out["triton"][1] - out["torch"][1]).abs().max())
            print(key, results[key], flush=True)


def timed(results, name, cfg):
    start = time.perf_counter()
    try:
        summary = engine.train(cfg)
    except Exception as exc:  # record and go on: the check reports every configuration
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(name, results[name], flush=True)
        return
    results[name] = {"best_top1": summary["best_top1"], "last_top1": summary["last_top1"],
                     "teacher_top1": summary["teacher_top1"], "s_per_epoch": summary["mean_train_time_s"],
                     "wall_s": round(time.perf_counter() - start, 1)}
    print(name, results[name], flush=True)


def main(out):
    os.makedirs(out, exist_ok=True)
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    results = {}
    gpu = dict(device="cuda", amp="auto", tensorboard=True)
    fm = write_fashion_mnist(os.path.join(out, "fm"), n_train=4096, n_test=1024)
    timed(results, "fm_teacher_bf16", run_cfg(out, fm, "fm_teacher", model="cnn_teacher", epochs=2, **gpu))
    teacher = os.path.join(out, "fm_teacher", checkpoint.LAST)
    compare_backends(results, teacher)
    # Distillation itself is checked on real data with `python -m train demo device=cuda ...`: this synthetic
    # teacher is so confident (logits up to ~50) that KD, TTM and WTTM students diverge at lr 0.05, on CPU too.

    cifar = write_cifar100(os.path.join(out, "cifar"), n_train=2048, n_test=512)
    for arch in ("resnet32x4", "vgg13"):
        torch.save({"model": build_model(arch, 100, (3, 32, 32)).state_dict()}, os.path.join(out, f"{arch}.pth"))
    for teacher_arch, student in (("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV2")):
        timed(results, f"cifar_{teacher_arch}_{student}_wttm", run_cfg(
            out, cifar, f"cifar_{student}", dataset="cifar100", model=student, teacher=teacher_arch,
            teacher_checkpoint=os.path.join(out, f"{teacher_arch}.pth"), loss="wttm", **gpu))

    imagenet = write_image_folder(os.path.join(out, "imagenet"))
    torch.save(build_model("tv_resnet34", 4, (3, 224, 224)).state_dict(), os.path.join(out, "resnet34.pth"))
    timed(results, "imagenet_tv_resnet34_tv_resnet18_wttm", run_cfg(
        out, imagenet, "imagenet", dataset="imagenet", model="tv_resnet18", teacher="tv_resnet34",
        teacher_checkpoint=os.path.join(out, "resnet34.pth"), loss="wttm", batch_size=16, test_batch_size=16,
        num_workers=2, **gpu))
    print("tensorboard files:", sorted(os.listdir(os.path.join(out, "imagenet", "tensorboard"))))
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu_check")
