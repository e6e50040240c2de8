# The seed's asynchronous sample client (shared/seeds/001), unchanged but for the URL and
# callback address, which can come from HEYGEM_API_URL and HEYGEM_CALLBACK_URL.
import os

import aiohttp
import aiofiles
import asyncio

async def create_task():
    API_URL = os.environ.get("HEYGEM_API_URL", "http://localhost:8101")

    # 准备文件
    audio_file_path = './samples/input/audio.mp3'
    video_file_path = './samples/input/video.mp4'

    # 创建 FormData
    data = aiohttp.FormData()

    # 添加音频文件
    async with aiofiles.open(audio_file_path, 'rb') as f:
        audio_content = await f.read()
        data.add_field(
            'audio_file',
            audio_content,
            filename='audio.mp3',
            content_type='audio/mpeg'
        )

    # 添加视频文件
    async with aiofiles.open(video_file_path, 'rb') as f:
        video_content = await f.read()
        data.add_field(
            'video_file',
            video_content,
            filename='video.mp4',
            content_type='video/mp4'
        )

    # 添加其他参数
    data.add_field('description', '测试任务')
    data.add_field('callback_url', os.environ.get(
        "HEYGEM_CALLBACK_URL", 'http://your-callback-url.com/webhook'))  # 可选的回调地址

    # 发送请求
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{API_URL}/tasks", data=data) as response:
            if response.status == 200:
                task = await response.json()
                print(f"任务创建成功!任务ID: {task['task_id']}")
                print(f"任务状态: {task['status']}")

                # 查询任务状态
                task_id = task['task_id']
                async with session.get(f"{API_URL}/tasks/{task_id}") as status_response:
                    task_status = await status_response.json()
                    print(f"当前任务状态: {task_status['status']}")
            else:
                error_text = await response.text()
                print(f"任务创建失败: {error_text}")

# 运行异步函数
asyncio.run(create_task())
