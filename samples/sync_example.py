# The seed's synchronous sample client (shared/seeds/001), unchanged but for two lines:
# the URL can come from HEYGEM_API_URL, and ./output is created if missing.
import os

import requests
import json

# API 服务地址
API_URL = os.environ.get("HEYGEM_API_URL", "http://localhost:8101")

# 准备文件
files = {
    'audio': ('audio.mp3', open('./samples/input/audio.mp3', 'rb')),
    'video': ('video.mp4', open('./samples/input/video.mp4', 'rb'))
}

# 准备请求数据
data = {
    'description': '测试任务'
}

# 发送同步生成请求
response = requests.post(
    f"{API_URL}/tasks/sync",
    files=files,
    data=data
)

# 处理响应
if response.status_code == 200:
    # 直接保存返回的视频流
    os.makedirs('./output', exist_ok=True)
    output_path = './output/result.mp4'
    with open(output_path, 'wb') as f:
        f.write(response.content)
    print(f"视频生成成功!已保存到: {output_path}")
else:
    print(f"视频生成失败: {response.text}")
