@echo off
rem Train the two-stage cascade with the documented recipe, or run a quick demo on the synthetic set (Windows).
rem
rem Usage:
rem   train.cmd [training flags ...]          the documented recipe on a prepared workspace
rem   train.cmd --demo [training flags ...]   synthetic workspace in demo\, tiny training, inference
rem
rem Training flags are appended last, so they override the defaults (see: python cascade_segmentation_model.py --help).
rem Environment (default in brackets): WORKSPACE [workspace], CHECKPOINTS [checkpoints], LOGDIR [runs\cascade],
rem STAGES [both | 1 | 2], PYTHON [.venv\Scripts\python.exe if present, else python], DEMO_DIR [demo], DEVICE [auto].
rem Several GPUs: use torchrun directly (gloo backend on Windows), e.g.
rem   python -m torch.distributed.run --standalone --nproc_per_node=2 cascade_segmentation_model.py --train-both ...
setlocal EnableExtensions
cd /d "%~dp0"

if not defined PYTHON (
    if exist ".venv\Scripts\python.exe" (set "PYTHON=.venv\Scripts\python.exe") else (set "PYTHON=python")
)

set "DEMO=0"
if /I "%~1"=="--demo" (
    set "DEMO=1"
    shift
)
rem Collect the remaining arguments (%* would still hold --demo after shift).
set "EXTRA="
:collect
if "%~1"=="" goto collected
set EXTRA=%EXTRA% %1
shift
goto collect
:collected

if "%DEMO%"=="1" goto demo

if not defined WORKSPACE set "WORKSPACE=workspace"
if not defined CHECKPOINTS set "CHECKPOINTS=checkpoints"
if not defined LOGDIR set "LOGDIR=runs\cascade"
if not defined STAGES set "STAGES=both"
if not exist "%WORKSPACE%\tissue_dataset.csv" goto noworkspace
if not exist "%WORKSPACE%\unified_segmentation_dataset.csv" goto noworkspace
set "STAGE_FLAG="
if /I "%STAGES%"=="both" set "STAGE_FLAG=--train-both"
if "%STAGES%"=="1" set "STAGE_FLAG=--train-stage1"
if "%STAGES%"=="2" set "STAGE_FLAG=--train-stage2"
if not defined STAGE_FLAG (
    echo error: STAGES must be both, 1 or 2, not "%STAGES%" 1>&2
    exit /b 2
)
"%PYTHON%" cascade_segmentation_model.py %STAGE_FLAG% --tissue-csv "%WORKSPACE%\tissue_dataset.csv" --cancer-csv "%WORKSPACE%\unified_segmentation_dataset.csv" --stage1-checkpoint-dir "%CHECKPOINTS%\stage1" --stage2-checkpoint-dir "%CHECKPOINTS%\stage2" --logdir "%LOGDIR%" %EXTRA%
exit /b %ERRORLEVEL%

:noworkspace
echo error: "%WORKSPACE%" holds no tissue_dataset.csv / unified_segmentation_dataset.csv. Prepare a workspace first: 1>&2
echo   "%PYTHON%" prepare_to_train.py --tissue-dir ..\shared\data\tissue\train_valid --lesion-dir ..\shared\data\lesion_cdd_cesm --workspace "%WORKSPACE%" 1>&2
echo or set WORKSPACE, or try: train.cmd --demo 1>&2
exit /b 2

:demo
if not defined DEMO_DIR set "DEMO_DIR=demo"
if not defined DEVICE set "DEVICE=auto"
echo [demo] synthetic workspace in %DEMO_DIR%\workspace (a smoke test: not data to judge the models by)
"%PYTHON%" prepare_to_train.py --synthetic 16 --workspace "%DEMO_DIR%\workspace"
if errorlevel 1 exit /b %ERRORLEVEL%
echo [demo] training both stages briefly
"%PYTHON%" cascade_segmentation_model.py --train-both --tissue-csv "%DEMO_DIR%\workspace\tissue_dataset.csv" --cancer-csv "%DEMO_DIR%\workspace\unified_segmentation_dataset.csv" --stage1-checkpoint-dir "%DEMO_DIR%\checkpoints\stage1" --stage2-checkpoint-dir "%DEMO_DIR%\checkpoints\stage2" --logdir "%DEMO_DIR%\runs" --epochs-stage1 2 --epochs-stage2 2 --img-size-stage1 128 64 --img-size-stage2 64 --batch-size-stage1 4 --batch-size-stage2 4 --max-batches-per-epoch 4 --num-workers 0 --keep-epoch-checkpoints 0 --encoder-weights none --overwrite %EXTRA%
if errorlevel 1 exit /b %ERRORLEVEL%
if not exist cascade_inference.py goto demodone
echo [demo] inference on two synthetic images
if not exist "%DEMO_DIR%\sample_images" mkdir "%DEMO_DIR%\sample_images"
set "COPIED=0"
for /R "%DEMO_DIR%\workspace\lesion" %%F in (*.png) do call :copysample "%%F"
"%PYTHON%" cascade_inference.py --stage1-weights "%DEMO_DIR%\checkpoints\stage1\best_stage1.pth" --stage2-weights "%DEMO_DIR%\checkpoints\stage2\best_stage2.pth" --image-dir "%DEMO_DIR%\sample_images" --output-dir "%DEMO_DIR%\predictions" --device %DEVICE% --overwrite
if errorlevel 1 exit /b %ERRORLEVEL%
:demodone
echo [demo] done: checkpoints in %DEMO_DIR%\checkpoints, TensorBoard: %PYTHON% -m tensorboard.main --logdir %DEMO_DIR%\runs
exit /b 0

:copysample
rem Copy the first two lesion images (not masks) into the sample folder.
if %COPIED% GEQ 2 goto :eof
echo %~dp1 | find /I "\images\" >nul || goto :eof
copy /Y "%~1" "%DEMO_DIR%\sample_images\" >nul
set /A COPIED+=1
goto :eof
